"""scripts/reproduce_small.py's rooms: what a comparison is (``comparisons``), one run
(``training``), the plan of runs and its resumption (``runs``), statistics over seeds (``stats``),
figures (``plots``) and tables (``report``)."""
