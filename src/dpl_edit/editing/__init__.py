"""Prompt-to-Prompt editing of inverted images: attention edits, the edit plan, the controller
and the sampling run that applies them."""

from .edit import EDIT_FILE, EditResult, edit, edit_record, plan_edit, reconstruct_latents
from .plan import MODES, EditConfig, EditPlan, make_plan, recommended_edit_config

__all__ = ["EDIT_FILE", "MODES", "EditConfig", "EditPlan", "EditResult", "edit", "edit_record", "make_plan", "plan_edit", "recommended_edit_config", "reconstruct_latents"]
