"""`curate labels import` on malformed files: one line per problem with its line number, nothing written."""

import pytest
from click.testing import CliRunner

from curation_assets.cli import main

GOOD = "uid,category,label\n"


@pytest.mark.parametrize("content, expected", [
    (b"", "line 1: empty file"),
    (b"\n  \n", "line 1: empty file"),
    (b"uid,cat,lbl\n00000/x,violence,1\n", "line 1: the header lacks columns ['category', 'label']"),
    (GOOD.encode() + b"00000/a,violence,1\n00000/b,viol\xe9nce,0\n", "line 3: not UTF-8 text (byte 0xe9)"),
    (GOOD.encode() + b"00000/a,violence,1,extra\n", "line 2: 4 fields, the header has 3"),
    (GOOD.encode() + b"00000/a,violence,1\n00000/b,violence\n", "line 3: 2 fields, the header has 3"),
    (GOOD.encode() + b'00000/a,"violence,1\n', "line 2"),
])
def test_malformed_label_files_are_one_line_errors_and_write_nothing(ingested, tmp_path, content, expected):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    before = ingested.storage.read("labels").height if ingested.storage.exists("labels") else 0
    result = CliRunner().invoke(main, ["labels", "import", str(path), "--root", str(ingested.root),
                                       "--config", str(ingested.root / "demo_config.yaml")])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert expected in result.stderr and "nothing written" in result.stderr
    assert "Traceback" not in result.output
    after = ingested.storage.read("labels").height if ingested.storage.exists("labels") else 0
    assert after == before


def test_labels_before_any_ingest_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(GOOD + "00000/a,violence,1\n")
    result = CliRunner().invoke(main, ["labels", "import", str(path), "--root", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no samples table yet" in result.stderr
