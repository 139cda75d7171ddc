"""fairseq_base: BASE layers (Lewis et al., ICML 2021) as a fairseq --user-dir plugin."""

from fairseq_base import fairseq_patches
from fairseq_base.errors import install_excepthook

# fairseq imports models/ only when it is the first to import this package (--user-dir);
# import it here so that the model is registered however the package was imported.
from fairseq_base import models  # noqa: F401,E402
from fairseq_base.models import transformer_lm_base  # noqa: F401,E402
from fairseq_base.criterions import base_cross_entropy  # noqa: F401,E402

__version__ = "0.1.0"

install_excepthook()
fairseq_patches.install()
