"""fairseq_base: BASE layers (Lewis et al., ICML 2021) as a fairseq --user-dir plugin.

fairseq imports ``models/`` itself when this package is given as --user-dir.
"""

from fairseq_base.errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()
