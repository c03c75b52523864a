"""The GAM family (``models/<name>/`` as flash-linear-attention lays out a family): ``model`` is
the paper's GAM (config, block, LM, receptive field), ``delta`` its extension gam-delta, which
reuses GAM's config and paths and adds a gated delta-rule memory written by the sequence."""

from gam.models.gam.delta import GAMDeltaBlock, GAMDeltaConfig, GAMDeltaLM, GAMDeltaState
from gam.models.gam.model import GAMLM, GAMBlock, GAMConfig, add_gam_paths, gam_receptive_field

__all__ = ["GAMLM", "GAMBlock", "GAMConfig", "GAMDeltaBlock", "GAMDeltaConfig", "GAMDeltaLM",
           "GAMDeltaState", "add_gam_paths", "gam_receptive_field"]
