"""`evoprune demo --quick`: the table, the op timing, the end-to-end table and the picture, with small models."""

import io

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("skimage")

from evoprune_ext import demo  # noqa: E402
from evoprune_ext.__main__ import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo(tmp_path, capsys):
    picture = tmp_path / "out" / "demo.png"
    main(["demo", "--quick", "--out", str(picture)])
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed
    table = printed.split("FLOPs saved")[1].split("The op alone")[0].split()
    assert table[:5] == ["off", "65", table[2], "1.00x", "0.0%"]
    for ratio, tokens in zip(demo.KEEP_RATIOS, (33, 17, 9), strict=True):
        assert table[table.index(f"{ratio:g}") + 1] == str(tokens)
    assert "torch.ops.evoprune.prune" in printed and "reference.prune" in printed
    end_to_end = printed.split("End to end")[1].split("speedup")[1].split("Wrote")[0].split()
    # keep ratio, visual tokens, prefill tokens, ms, speedup: 49 patches of the tiny LLaVA's 56 x 56 image.
    rows = [end_to_end[i : i + 5] for i in range(0, len(end_to_end), 5)]
    assert [row[:2] for row in rows] == [["off", "49"], ["0.5", "24"], ["0.25", "12"], ["0.125", "6"]]
    assert [int(row[2]) - int(row[1]) for row in rows] == [int(rows[0][2]) - 49] * 4  # the same text
    assert picture.read_bytes().startswith(PNG_MAGIC)


def test_demo_with_local_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    checkpoint = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**demo.QUICK)).save_pretrained(checkpoint)
    picture = tmp_path / "demo.png"
    out = io.StringIO()
    demo.run(weights=str(checkpoint), out_path=str(picture), quick=True, out=out)
    printed = out.getvalue()
    assert f"Weights from {checkpoint}" in printed and "RANDOM" not in printed
    assert picture.read_bytes().startswith(PNG_MAGIC)


def test_missing_extra_names_it():
    with pytest.raises(SystemExit, match=r"pip install evoprune_ext\[demo\]"):
        demo._require("evoprune_no_such_module", "demo")
