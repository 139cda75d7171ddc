"""What a comparison is: its models (each a config of configs/ and its overrides), its reference,
its length, and the name of each run."""

import os
from typing import NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Per comparison: model -> (config, overrides).
COMPARISONS = {
    "architectures": {"dense": ("small_dense", []), "BASE": ("small_base", []), "BASE x 3": ("small_base_x3", []),
                      "BASE Top": ("small_base_top", []), "Switch": ("small_switch", []),
                      "MoE top-2": ("small_moe_top2", []), "Hash": ("small_hash", [])},
    "routers": {"dense": ("small_dense", []),
                **{name: ("small_routers", [f"model.base_router={router}"]) for name, router in (
                    ("BASE", "balanced"), ("S-BASE", "sbase"), ("Switch", "switch"), ("MoE top-2", "top2"),
                    ("Hash", "hash"), ("lossfree", "lossfree"))},
                # The ablation that separates a router's choices from its gate's size (--base-gate one).
                **{f"{name} (gate 1)": ("small_routers", [f"model.base_router={router}", "model.base_gate=one"])
                   for name, router in (("BASE", "balanced"), ("Switch", "switch"), ("MoE top-2", "top2"))}},
    # FROM_DENSE go on from the dense start (START_UPDATES); BASE from scratch trains the whole length.
    # The expert FFNs (each expert a copy of the FFN it replaces) are the main arm; a BASE layer
    # inserted in the trunk starts as the identity.
    "upcycling": {"dense (continued)": ("small_dense", []),
                  "upcycled: expert FFNs": ("small_routers", ["model.base_router=balanced"]),
                  "upcycled: BASE layer": ("small_base", []), "BASE from scratch": ("small_base", [])},
}
DENSE = "small_dense"  # the config without experts
# The upcycling comparison starts from the quick run's dense model: scripts/quickrun.sh trains the
# same model (small_dense, seed 1) for the same 400 updates.
START_UPDATES = 400
FROM_DENSE = ("dense (continued)", "upcycled: expert FFNs", "upcycled: BASE layer")
REFERENCE = {"architectures": "BASE", "routers": "BASE", "upcycling": "dense (continued)"}
ROUTERS_UPDATES = 1000  # the routers comparison's default length (--updates)
UPCYCLING_UPDATES = 400  # the upcycling comparison's: as many again as the dense start had
BALANCED_BUSIEST = 1.2  # a busiest expert at most this over the mean counts as balanced
LOSSFREE_SCALED = "lossfree (rate scaled)"


class Arm(NamedTuple):
    """One model of a comparison, trained once per seed."""
    model: str  # its name in COMPARISONS
    config: str  # configs/CONFIG.yaml
    overrides: list
    experts: Optional[int]  # model.base_experts, where a sweep sets it
    updates: int  # optimization.max_update
    start: Optional[str] = None  # the dense checkpoint it goes on from (--continue-once), upcycled but for dense


def run_name(arm, seed):
    variant = "".join("-" + override.split("=", 1)[1] for override in arm.overrides)
    return (f"{arm.config}{variant}{f'-e{arm.experts}' if arm.experts else ''}{'-from-dense' if arm.start else ''}"
            f"-seed{seed}")


def balanced_family(arm):
    """Whether ``arm`` routes as BASE's family (balanced in training, --base-eval-routing outside):
    its test perplexity is also scored with balanced evaluation routing."""
    routers = [o.split("=", 1)[1] for o in arm.overrides if o.startswith("model.base_router=")]
    return routers[-1] in ("balanced", "sbase") if routers else arm.config.startswith("small_base")
