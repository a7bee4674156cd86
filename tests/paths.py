"""Where test fixtures live: the bundled model, and ../shared/models beside the checkout
(CI clones the repository with shared/ beside it)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
STORIES_HF = ROOT / "reft" / "assets" / "stories260K"
SMOL_TOKENIZER = SHARED_MODELS / "smollm2-135m-instruct" / "hf_tokenizer"
