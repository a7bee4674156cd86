"""Where test fixtures live: the bundled model, and ../shared/models beside the checkout
(CI clones the repository with shared/ beside it)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
STORIES_HF = ROOT / "reft" / "assets" / "stories260K"
SMOL_TOKENIZER = SHARED_MODELS / "smollm2-135m-instruct" / "hf_tokenizer"
# SmolLM2-135M-Instruct Q4_1 GGUF: tools/fetch_smollm2.py puts it in .cache/models; a bench
# machine may hold it beside the checkout. None when absent (the tests that need it skip).
SMOLLM2_GGUF = next((p for p in (ROOT / ".cache" / "models" / "smollm2-135m-instruct-q4_1.gguf",
                                 ROOT.parent / "bench" / "models" / "smollm2-135m-instruct-q4_1.gguf")
                     if p.is_file()), None)
