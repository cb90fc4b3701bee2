"""Bad text input for language models through the CLI: an empty file, a missing "text" column, a sequence length
<= 1, a model folder without a tokenizer, an empty document, image data for a text model. Each ends with exit code
2, one line on stderr naming the problem, no traceback, and nothing under the artefacts' root changed."""
from __future__ import annotations

import json
import shutil

import pytest

from fixtures.lms import fortune_texts, write_jsonl, write_tiny_lm
from fixtures.reliability import refused

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-bad")
    write_tiny_lm(root / "base")
    shutil.copytree(root / "base", root / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (root / "no_tokenizer" / name).unlink(missing_ok=True)
    write_jsonl(root / "good.jsonl", fortune_texts(12))
    (root / "empty.jsonl").write_text("")
    (root / "no_text.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in fortune_texts(3)))
    write_jsonl(root / "empty_doc.jsonl", ["a fine document", ""])
    (root / "empty_folder").mkdir()
    return root


CASES = [
    ("empty-file", "train --base {base} --data jsonl:{empty.jsonl}", "empty file"),
    ("missing-column", "train --base {base} --data jsonl:{no_text.jsonl}", 'no "text" column'),
    ("seq-len-one", "train --base {base} --data jsonl:{good.jsonl} --model-options @seq1", "sequence length must"),
    ("seq-len-zero", "train --base {base} --data jsonl:{good.jsonl} --model-options @seq0", "sequence length must"),
    ("seq-len-too-long", "train --base {base} --data jsonl:{good.jsonl} --model-options @seq99",
     "longer than the model's context"),
    ("no-tokenizer", "train --base {no_tokenizer} --data jsonl:{good.jsonl}", "has no tokenizer"),
    ("empty-document", "train --base {base} --data jsonl:{empty_doc.jsonl}", "document id 1 has 1 token"),
    ("empty-folder", "train --base {base} --data textfolder:{empty_folder}", "no .txt files"),
    ("missing-file", "train --base {base} --data jsonl:{missing.jsonl}", "text file not found"),
    ("image-data", "train --base {base} --data digits --n 8", "is not text"),
    ("unknown-option", "train --base {base} --data jsonl:{good.jsonl} --model-options @unknown",
     "unknown language-model setting"),
    ("lora-alpha", "train --base {base} --data jsonl:{good.jsonl} --lora-rank 2 --model-options @alpha",
     "lora_alpha must be a positive number"),
    ("lora-targets", "train --base {base} --data jsonl:{good.jsonl} --lora-rank 2 --model-options @targets",
     "lora_targets must be a list"),
    ("lora-targets-missing", "train --base {base} --data jsonl:{good.jsonl} --lora-rank 2 --model-options @nowhere",
     "cannot add LoRA adapters"),
    ("featurize-empty", "featurize --checkpoint {base} --data jsonl:{empty.jsonl}", "empty file"),
    ("featurize-no-tokenizer", "featurize --checkpoint {no_tokenizer} --data jsonl:{good.jsonl}", "has no tokenizer"),
    ("featurize-images", "featurize --checkpoint {base} --data digits --n 4", "is not text"),
    ("build-lm-empty", "build-lm --data jsonl:{empty.jsonl}", "empty file"),
    ("build-lm-context", "build-lm --context 1", "--context must be >= 2"),
]


@pytest.mark.parametrize("case, command, words", CASES, ids=[c[0] for c in CASES])
def test_bad_text_input_is_refused_in_one_line(root, capsys, case, command, words):
    values = {"@seq1": '{"seq_len": 1}', "@seq0": '{"seq_len": 0}', "@seq99": '{"seq_len": 99}',
              "@unknown": '{"block_size": 8}', "@alpha": '{"lora_alpha": "big"}', "@targets": '{"lora_targets": 3}',
              "@nowhere": '{"lora_targets": ["q_proj"]}'}
    argv = []
    for word in command.split():
        if "{" in word:  # a path under the artefacts' root
            head, _, rest = word.partition("{")
            word = head + str(root / rest.rstrip("}"))
        argv.append(values.get(word, word))
    argv += ["--out", str(root.parent / f"out-{case}")]
    refused(capsys, argv, words, root)
    assert not (root.parent / f"out-{case}").exists()
