"""Writes a random tiny Gemma 3 checkpoint (transformers' own save_pretrained) with a small
SentencePiece tokenizer: `python tests/make_tiny_checkpoint.py DIR [gemma3|gemma2|gemma|gemma3_mm]`
(gemma3_mm: multimodal, with a tiny SigLIP vision tower and projector)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "gemma3"
    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokenizer.model"
    conftest._train_tokenizer(tok)
    model = conftest.make_hf_mm_model() if kind == "gemma3_mm" else conftest.make_hf_model(kind)
    conftest.save_checkpoint(model, out, tok)
    print(out)
