"""Data formats, config loading, guardrails and the bad inputs a user will hit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import potstill
from potstill.config import RunConfig, describe_fields
from potstill.data.encode import encode_all
from potstill.data.loading import load_records
from potstill.guardrails import TokenizerMismatch, check_pair, shared_vocab
from potstill.labels import IGNORE_INDEX
from potstill.train import RunDirError
from tests.conftest import save_tiny_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.objective().terms


def test_shipped_configs_exist():
    assert (CONFIG_DIR / "quickstart.yaml").exists()


def test_overrides_and_did_you_mean(tmp_path):
    cfg = RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.max_steps=7", "loss.objective=0.5*ce+0.5*rkl"])
    assert cfg.train.max_steps == 7 and [t.name for t in cfg.objective().terms] == ["ce", "rkl"]
    with pytest.raises(ValueError, match=r"unknown config key 'train.max_stpes'. Did you mean \"max_steps\""):
        RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.max_stpes=7"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  temprature: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'loss.temprature'. Did you mean \"temperature\""):
        RunConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="'train.batch_size' expects int"):
        RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.batch_size=big"])
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_field_docstrings_are_the_help_text():
    docs = {key: doc for key, _, doc in describe_fields()}
    assert docs["train.grad_accum"].startswith("Micro-batches per optimiser step")
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "oops"\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed JSON"):
        load_records(str(path))
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: a record needs 'text'"):
        load_records(str(path))


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the dataset is empty"):
        load_records(str(tmp_path / "empty.jsonl"))


def test_prompt_completion_and_chat_masks(tokenizer):
    records = [{"prompt": "what is 1 + 2 ?", "completion": " answer 3"},
               {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
                             {"role": "user", "content": "the man"}, {"role": "assistant", "content": "runs"}]}]
    (pc, chat), _ = encode_all(tokenizer, list(enumerate(records)), 128, "test")
    trained = tokenizer.convert_ids_to_tokens([t for t in pc.labels if t != IGNORE_INDEX])
    assert trained == ["answer", "3", "</s>"]
    chat_trained = tokenizer.convert_ids_to_tokens([t for t in chat.labels if t != IGNORE_INDEX])
    assert chat_trained == ["a", "dog", "</s>", "runs", "</s>"]
    assert tokenizer.decode(chat.input_ids) .startswith("user : the cat assistant : a dog")


def test_parquet_and_datasets_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "the cat runs ."}, {"text": "a dog sleeps ."}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    assert load_records(str(tmp_path / "d.parquet")) == list(enumerate(ds.to_list()))
    assert load_records(str(tmp_path / "dsdir")) == list(enumerate(ds.to_list()))


def test_different_tokenizers_are_refused(tmp_path, tokenizer, model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "zebra"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    student_dir = save_tiny_model(tmp_path / "other", "llama", other, vocab=len(tokenizer))
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"])
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    with pytest.raises(TokenizerMismatch, match=r"vocabularies differ \(479 vs 7 tokens\).*'zebra'"):
        check_pair(tokenizer, AutoTokenizer.from_pretrained(student_dir), teacher, student)
    cfg = RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student_dir}",
                                     f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(TokenizerMismatch, match="cross-tokenizer|tokenizers differ"):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run" / "final").exists()


def test_same_vocab_but_different_tokenization_is_refused(tmp_path, tokenizer, model_dirs, text_jsonl):
    # transformers loads a tokenizer saved in a qwen2 directory as Qwen2Tokenizer: same vocabulary, other ids.
    student = save_tiny_model(tmp_path / "q", "qwen2", tokenizer, with_tokenizer=True)
    cfg = RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student}",
                                     f"data.train={text_jsonl}", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(TokenizerMismatch, match="tokenize .* differently"):
        potstill.distill(cfg, progress=False)


def test_padded_vocab_sizes(tmp_path, tokenizer, model_dirs, text_jsonl):
    # Teacher head padded to 512 rows, student to 480: both trimmed to the tokenizer's 479 real tokens.
    teacher = save_tiny_model(tmp_path / "t", "llama", tokenizer, vocab=512)
    student = save_tiny_model(tmp_path / "s", "qwen2", tokenizer, vocab=480, with_tokenizer=False)
    assert shared_vocab(479, 512, 480) == 479
    with pytest.raises(ValueError, match="output layer has 400 rows but the tokenizer has 479"):
        shared_vocab(479, 512, 400)
    cfg = RunConfig.from_yaml(None, [f"teacher.path={teacher}", f"student.path={student}", f"data.train={text_jsonl}",
                                     f"out_dir={tmp_path / 'run'}", "train.max_steps=2", "data.max_eval_examples=4",
                                     "eval.max_new_tokens=2"])
    result = potstill.distill(cfg, progress=False)
    assert torch.isfinite(torch.tensor(result.metrics["kl_teacher_student"]))


def test_run_dir_holding_a_run_is_refused(tmp_path, model_dirs, text_jsonl):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    cfg = RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}",
                                     f"data.train={text_jsonl}", f"out_dir={out}"])
    with pytest.raises(RunDirError, match="already holds a run; pass --resume .* or --overwrite"):
        potstill.distill(cfg, progress=False)
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        potstill.distill(cfg, resume=True, progress=False)
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_student_from_config_and_teacher_truncation(tmp_path, model_dirs, text_jsonl):
    base = [f"teacher.path={model_dirs['llama_teacher']}", f"data.train={text_jsonl}", "train.max_steps=2",
            "data.max_eval_examples=4", "eval.max_new_tokens=2"]
    trunc = RunConfig.from_yaml(None, base + ["student.init_from_teacher_layers=1", f"out_dir={tmp_path / 'a'}"])
    res = potstill.distill(trunc, progress=False)
    assert json.loads((res.final_dir / "config.json").read_text())["num_hidden_layers"] == 1
    fresh = RunConfig.from_yaml(None, base + ['student.config={"model_type": "qwen2", "hidden_size": 16, '
                                              '"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, '
                                              '"num_key_value_heads": 1}', f"out_dir={tmp_path / 'b'}"])
    res = potstill.distill(fresh, progress=False)
    assert json.loads((res.final_dir / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(ValueError, match="exactly one of student.path"):
        RunConfig.from_yaml(None, base + ["student.init_from_teacher_layers=1", f"student.path={model_dirs['qwen2_student']}"])


def test_numbers_as_people_write_them(tmp_path):
    cfg = RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.lr=3e-4", "train.max_steps=1e3",
                                                                "cache.proposal_temperature=2E0"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.cache.proposal_temperature == 2.0
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  max_steps: 1e3\n  warmup_steps: 1.5e1\n")  # PyYAML reads these as strings
    cfg = RunConfig.from_yaml(path, ["student.init_from_teacher_layers=1", "teacher.path=t"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps) == (3e-4, 1000, 15)
    with pytest.raises(ValueError, match=r"'train.max_steps' expects int \(a whole number\), got '1e-3'"):
        RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.max_steps=1e-3"])
    with pytest.raises(ValueError, match=r"'train.lr' expects float, got 'fast'"):
        RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["train.lr=fast"])
    assert RunConfig.from_yaml(CONFIG_DIR / "quickstart.yaml", ["data.train=1e3"]).data.train == "1e3"  # str stays


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ValueError, match=r"bad.yaml:3: invalid YAML \(expected the node content"):
        RunConfig.from_yaml(path)
    with pytest.raises(ValueError, match=r"override 'loss.objective=\[': invalid YAML"):
        RunConfig.from_yaml(None, ["loss.objective=["])
    path.write_bytes(b"train:\n  lr: 0.1 # \xe9\n")
    with pytest.raises(ValueError, match=r"bad.yaml:2: not valid UTF-8 \(byte 0xe9\)"):
        RunConfig.from_yaml(path)
