"""Import guards: the reference needs no Megatron; a broken Transformer Engine gets a clear
message instead of a traceback from inside Megatron; optional dependencies name the feature."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from stag_plugin.compat import megatron as megatron_compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, REPO) if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_reference_imports_without_megatron():
    result = run_python("""
        import sys
        sys.modules["megatron"] = None  # any import of megatron now fails
        import stag_plugin
        from stag_plugin.reference.model import StagFormer, ReferenceConfig
        import torch
        cfg = ReferenceConfig(vocab_size=32, max_sequence_length=16, num_layers=2, hidden_size=16,
                              num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32,
                              head_dim=8)
        print(StagFormer(cfg)(torch.zeros(1, 5, dtype=torch.long)).shape)
    """)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5, 32])" in result.stdout


def test_inference_folder_decodes_without_megatron(tmp_path):
    """A converted inference folder loads into the reference model and decodes with
    ReferenceDecoder (shared sampling loop) while any import of megatron fails."""
    result = run_python(f"""
        import sys
        sys.modules["megatron"] = None  # any import of megatron now fails
        import torch
        from stag_plugin.convert.inference_folder import (load_inference_folder,
                                                          save_inference_folder)
        from stag_plugin.reference.model import ReferenceConfig, StagFormer
        from stag_plugin.reference.decode import ReferenceDecoder
        from stag_plugin.reference.sampling import Sampler
        cfg = ReferenceConfig(vocab_size=32, max_sequence_length=16, num_layers=4, hidden_size=16,
                              num_attention_heads=2, num_query_groups=1, ffn_hidden_size=32,
                              head_dim=8, cross_attention_window=2)
        torch.manual_seed(0)
        folder = save_inference_folder({str(tmp_path / "folder")!r}, cfg,
                                       StagFormer(cfg).state_dict())
        model = load_inference_folder(folder).model
        tokens = torch.randint(0, 32, (2, 9))
        decoder = ReferenceDecoder(model, max_batch_size=2, max_sequence_length=9)
        logits = [decoder.prefill(tokens[:, :3])]
        logits += [decoder.step(tokens[:, t]) for t in range(3, 9)]
        diff = (torch.stack(logits, 1) - model(tokens)[:, 2:]).abs().max().item()
        new = decoder.generate(tokens[:, :3], 4, Sampler(temperature=1.0, seed=0))
        loaded = [name for name, module in sys.modules.items()
                  if name.startswith("megatron") and module is not None]
        print("diff", diff < 1e-5, [len(seq) for seq in new], loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert "diff True [4, 4] []" in result.stdout, result.stdout


def test_broken_transformer_engine_gets_a_clear_message(tmp_path):
    fake = tmp_path / "transformer_engine"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise RuntimeError("libcudnn.so.9: cannot open shared object file")\n')
    result = run_python("import stag_plugin.core.model", extra_path=str(tmp_path))
    assert result.returncode != 0
    final_error = result.stderr[result.stderr.rindex("\nImportError: "):]  # what the user reads
    assert final_error.startswith("\nImportError: Megatron-Core could not be imported because "
                                  "Transformer Engine failed to load: libcudnn"), result.stderr
    assert "pip uninstall" in final_error


def test_missing_triton_gets_the_install_hint(monkeypatch):
    """megatron-core 0.19 imports triton at start-up; a CPU torch build does not bring it."""
    def no_triton(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(megatron_compat.importlib, "import_module", no_triton)
    with pytest.raises(ImportError, match=r"imports triton.*Fix: `pip install triton`"):
        megatron_compat.import_megatron_core()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None,
                    reason="deepspeed is installed here")
def test_missing_optional_dependency_names_feature_and_install():
    with pytest.raises(ImportError, match=r"ZeRO training needs the optional dependency "
                                          r"'deepspeed'.*pip install deepspeed"):
        megatron_compat.require_optional("deepspeed", "ZeRO training")


def test_unknown_optional_dependency_is_a_programming_error():
    with pytest.raises(KeyError):
        megatron_compat.require_optional("flash_attn_9", "nothing")


def test_cpu_rotary_embedding_matches_formula():
    import torch

    from stag_testing import tiny_config

    rope = megatron_compat.rotary_embedding(tiny_config())
    emb = rope(6, offset=2)  # [s, 1, 1, d]
    dim = emb.shape[-1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(2, 8).float(), inv_freq)
    torch.testing.assert_close(emb[:, 0, 0], torch.cat([freqs, freqs], dim=-1))


def test_backend_choice():
    from stag_plugin.core.specs import get_backend

    with pytest.raises(ValueError, match="unknown StagFormer backend 'triton'"):
        get_backend("triton")
    if megatron_compat.transformer_engine_available():
        assert type(get_backend("transformer_engine")).__name__ == "StagTESpecProvider"
        return
    with pytest.raises(ImportError, match="Transformer Engine backend.*pip install"):
        get_backend("transformer_engine")
