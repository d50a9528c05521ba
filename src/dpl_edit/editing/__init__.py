"""Prompt-to-Prompt editing of inverted images: attention edits, the edit plan, the controller
and the sampling run that applies them."""

from .edit import EditResult, edit, plan_edit, reconstruct_latents
from .plan import MODES, EditConfig, EditPlan, make_plan, recommended_edit_config

__all__ = ["MODES", "EditConfig", "EditPlan", "EditResult", "edit", "make_plan", "plan_edit", "recommended_edit_config", "reconstruct_latents"]
