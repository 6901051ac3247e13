"""Writes a random tiny Gemma 3 checkpoint (transformers' own save_pretrained) with a small
SentencePiece tokenizer: `python tests/make_tiny_checkpoint.py DIR [gemma3|gemma2|gemma]`."""
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
    conftest.save_checkpoint(conftest.make_hf_model(kind), out, tok)
    print(out)
