"""The evaluation results the papers publish, which this project's measures are read beside.

Each is printed where ours is measured the same way (``dpl metrics`` on PIE-Bench, the background
mask's IoU in ``dpl check-scenes``) and pinned in ``tests/test_published_numbers.py``. The methods'
settings (thresholds, weights, schedules) live in their configs, not here.
"""

from __future__ import annotations

# DPL (Wang et al., NeurIPS 2023), Table 1: word swap on 20 LAION images each, SD 1.4.
# CLIP-Score in percent (higher is better), Structure-Dist (DINO self-similarity, lower is better;
# not scaled); "original images" is the source images' CLIP-Score with the target prompt.
DPL_WORD_SWAP = {
    "cat -> leopard, dog -> tiger": {
        "original images": {"clip_score": 32.50},
        "nti": {"clip_score": 31.50, "structure_dist": 0.0800},
        "dpl": {"clip_score": 32.23, "structure_dist": 0.0312},
    },
    "book -> box, clock -> sunflower": {
        "original images": {"clip_score": 16.46},
        "nti": {"clip_score": 12.91, "structure_dist": 0.0191},
        "dpl": {"clip_score": 14.29, "structure_dist": 0.0163},
    },
}
# Table 1's forced-choice user study (20 evaluators, 60 pairs): the share of choices, percent.
DPL_USER_STUDY = {"nti": 12.8, "dpl": 87.2}
# DPL's supplementary material: IoU of the background mask (self-attention clusters, Sec. 3.3)
# with the true background, by the number of objects in the image.
DPL_BACKGROUND_MASK_IOU = {1: 0.803, 2: 0.749}

# PIE-Bench (Ju et al., ICLR 2024), Prompt-to-Prompt after each inversion, SD 1.4, all 700 images,
# in PIE-Bench's units (structure distance and LPIPS x 10^3, MSE x 10^4, SSIM x 10^2), under
# ``dpl metrics``' names (direct inversion's MSE and SSIM are left out: not found in a source read here).
PIE_BENCH_P2P = {
    "nti": {
        "structure_distance": 13.44, "psnr_unedit_part": 27.03, "lpips_unedit_part": 60.67,
        "mse_unedit_part": 35.86, "ssim_unedit_part": 84.11, "clip_similarity_target_image": 24.75,
        "clip_similarity_target_image_edit_part": 21.86,
    },
    "direct": {
        "structure_distance": 11.65, "psnr_unedit_part": 27.22, "lpips_unedit_part": 54.55,
        "clip_similarity_target_image": 25.02, "clip_similarity_target_image_edit_part": 22.10,
    },
}
PIE_BENCH_ITEMS = 700
