"""The files a user hands the fine-tuning runners and the model, read the way they come: GLUE's --data_dir as
the root or the task's directory, SQuAD/GLUE files that are not UTF-8, hand-written config.json values.
Every bad one is one line naming the file and the field."""

import json
import os
import shutil

import pytest

from paddle_megatronbert.configuration import MegatronBertConfig
from paddle_megatronbert.data.glue import get_glue_task, glue_task_dir, load_glue_split
from paddle_megatronbert.data.squad import read_squad_examples

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GLUE_ROOT = os.path.join(FIXTURES, "glue")


def test_glue_data_dir_may_be_the_root_or_the_task_directory(tmp_path):
    mnli = get_glue_task("mnli")
    from_root = load_glue_split(mnli, "dev_mismatched", GLUE_ROOT)
    from_task_dir = load_glue_split(mnli, "dev_mismatched", os.path.join(GLUE_ROOT, "MNLI"))
    assert len(from_root) > 0
    assert [(e.text_a, e.label) for e in from_root] == [(e.text_a, e.label) for e in from_task_dir]
    # A lower-case task directory under the root is found too.
    shutil.copytree(os.path.join(GLUE_ROOT, "RTE"), tmp_path / "rte")
    assert glue_task_dir(str(tmp_path), get_glue_task("RTE")) == str(tmp_path / "rte")


def test_glue_data_dir_of_another_task_or_without_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--data_dir .*SST-2 is the SST-2 directory but --task_name is RTE"):
        glue_task_dir(os.path.join(GLUE_ROOT, "SST-2"), get_glue_task("rte"))
    with pytest.raises(FileNotFoundError, match=r"neither a MNLI/ directory \(the GLUE root\) nor MNLI's train.tsv"):
        glue_task_dir(str(tmp_path), get_glue_task("mnli"))


def test_non_utf8_glue_and_squad_files_name_the_file_and_line(tmp_path):
    tsv = tmp_path / "SST-2" / "train.tsv"
    tsv.parent.mkdir()
    tsv.write_bytes("sentence\tlabel\nfine film\t1\n".encode() + "caf\u00e9 cr\u00e8me\t0\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_glue_split(get_glue_task("sst-2"), "train", str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tsv}:3: the GLUE SST-2 file is not UTF-8 text (byte 0xe9)") and "\n" not in message

    squad = tmp_path / "dev-v1.1.json"
    squad.write_bytes(b'{"version": "1.1",\n "data": [{"title": "Caf\xe9"}]}')
    with pytest.raises(ValueError, match=rf"^{squad}:2: the SQuAD file is not UTF-8 text \(byte 0xe9\)"):
        read_squad_examples(str(squad), version_2_with_negative=False)


def test_utf8_with_byte_order_mark_reads(tmp_path):
    with open(os.path.join(FIXTURES, "squad", "squad_v1.json"), encoding="utf-8") as f:
        text = f.read()
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    examples, _ = read_squad_examples(str(bom), version_2_with_negative=False)
    plain, _ = read_squad_examples(os.path.join(FIXTURES, "squad", "squad_v1.json"), version_2_with_negative=False)
    assert [e.qas_id for e in examples] == [e.qas_id for e in plain] and len(plain) > 0


@pytest.mark.parametrize("field,value,expected", [
    ("recompute", "false", "config field recompute must be true or false (a JSON boolean), got 'false'"),
    ("tie_word_embeddings", 0, "config field tie_word_embeddings must be true or false (a JSON boolean), got 0"),
    ("pad_token_id", 1003, "config field pad_token_id must be an id in the vocab (0 to 1002), got 1003"),
    ("pad_token_id", -1, "config field pad_token_id must be an id in the vocab (0 to 1002), got -1"),
    ("layer_norm_eps", 0, "config field layer_norm_eps must be > 0, got 0"),
])
def test_bad_config_values_are_one_line_naming_the_file_and_field(tmp_path, field, value, expected):
    fields = dict(vocab_size=1003, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**fields, field: value}))
    with pytest.raises(ValueError) as err:
        MegatronBertConfig.from_json_file(str(path), strict=True)
    assert str(err.value) == f"{path}: {expected}"
    assert MegatronBertConfig.from_dict({**fields, field: MegatronBertConfig.__dataclass_fields__[field].default})


def test_json_booleans_still_read():
    config = MegatronBertConfig.from_dict(json.loads('{"recompute": true, "do_lower_case": false}'))
    assert config.recompute is True and config.do_lower_case is False
