"""The ``auto`` dtype follows the CPU's native bf16 support."""

from __future__ import annotations

import pytest

from scoring import hardware


@pytest.mark.parametrize(("flags", "dtype"), [({"avx2", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                                              ({"avx2", "fma"}, "float32"), (set(), "float32")])
def test_auto_dtype_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str], dtype: str) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.auto_dtype("cpu") == dtype



@pytest.mark.parametrize(("flags", "kind"), [({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
                                             ({"avx2", "avx512f"}, "avx512"), ({"avx2", "fma"}, "avx2"),
                                             (set(), "other")])
def test_cpu_kind_names_the_widest_vector_feature(monkeypatch: pytest.MonkeyPatch, flags: set[str], kind: str) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.cpu_kind("cpu") == kind
    assert hardware.cpu_kind("cuda:0") == "cuda"
