"""The hub's config.json of Qwen2.5-VL-3B-Instruct and -7B-Instruct (flat form), as users have them on disk: the
files the planner uses (qvl_core/known_models)."""

from qvl_core.known_models import known_config

QWEN25_VL_3B = known_config("Qwen2.5-VL-3B-Instruct")[1]
QWEN25_VL_7B = known_config("Qwen2.5-VL-7B-Instruct")[1]
