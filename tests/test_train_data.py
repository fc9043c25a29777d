"""train/data.py and train/rewards.py: formats, validation with file:line, thinking fusion, rewards
(the code reward runs real subprocesses in its sandbox)."""

from __future__ import annotations

import json
import socket

import pytest

from posttrain.errors import PosttrainError
from posttrain.train import rewards
from posttrain.train.data import EMPTY_THINK, DataSource, builtin_names, load


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name, method, keys", [
    ("chat", "sft", {"messages"}), ("dolly", "sft", {"messages"}), ("gsm8k", "sft", {"messages"}),
    ("thinking", "sft", {"messages"}), ("preference", "dpo", {"prompt", "chosen", "rejected"}),
    ("gsm8k", "grpo", {"prompt", "answer"}), ("code", "grpo", {"prompt", "tests", "entry_point"}),
    ("mixed_prompts", "grpo", {"prompt", "answer"}),
])
def test_every_builtin_sample_loads_for_its_method(name, method, keys):
    data = load([DataSource(path=f"builtin:{name}")], method)
    assert len(data.rows) >= 12 and set(data.rows[0]) == keys
    assert data.files[0].name == f"{name}.jsonl"


def test_builtin_names_and_unknown_ones():
    assert {"chat", "dolly", "preference", "gsm8k", "thinking", "code"} <= set(builtin_names())
    with pytest.raises(PosttrainError, match="unknown built-in dataset 'builtin:nope'.*builtin:chat"):
        load([DataSource(path="builtin:nope")], "sft")


def test_formats_normalize_to_trl_shapes(tmp_path):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats nap."}])
    assert load([DataSource(path=dolly)], "sft").rows[0]["messages"] == [
        {"role": "user", "content": "Summarize.\n\nCats sleep a lot."}, {"role": "assistant", "content": "Cats nap."}]
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2+2 = <<2+2=4>>4\n#### 4"}])
    assert load([DataSource(path=gsm)], "sft").rows[0]["messages"][1]["content"] == "2+2 = 4\n#### 4"
    assert load([DataSource(path=gsm, system_prompt="Be brief.")], "grpo").rows[0] == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"}
    reasoning = write_jsonl(tmp_path / "r.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning": "Greet back."}]}])
    assert load([DataSource(path=reasoning)], "sft").rows[0]["messages"][1]["content"] == \
        "<think>\nGreet back.\n</think>\n\nHello"


def test_preference_pairs_from_strings_messages_hh_and_the_arena_export(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the...",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}
    arena = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}], "meta": {"battle_id": 3}}
    plain = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    rows = load([DataSource(path=write_jsonl(tmp_path / "p.jsonl", [hh, arena, plain]))], "dpo").rows
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Joke?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Why did the..."}]
    assert rows[1] == rows[2] == {k: arena[k] for k in ("prompt", "chosen", "rejected")}


CHAT = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
GSM8K = '{"question": "q", "answer": "1 + 1\\n#### 2"}'


@pytest.mark.parametrize("first, bad, message", [
    (CHAT, '{"messages": [{"role": "user", "content": "x"}', "invalid JSON"),
    (CHAT, "[1, 2]", "expected a JSON object, got list"),
    (CHAT, '{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of system, user, assistant, not 'bot'"),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn to learn from"),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a <think>b</think>"}]}',
     "a reasoning trace must be one <think>...</think> block at the start"),
    (CHAT, '{"prompt": "x", "completion": "y"}', "missing 'messages'"),
    (GSM8K, '{"question": "q", "answer": "no final number"}', "'answer' must end with '#### <number>'"),
])
def test_a_bad_record_is_reported_with_file_and_line(tmp_path, first, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [first, "", bad])
    with pytest.raises(PosttrainError) as error:
        load([DataSource(path=path)], "sft")
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_hh_transcripts_must_share_their_history(tmp_path):
    row = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    with pytest.raises(PosttrainError, match=r"p\.jsonl:1: chosen and rejected transcripts differ"):
        load([DataSource(path=write_jsonl(tmp_path / "p.jsonl", [row]))], "dpo")


def test_method_and_format_mismatch_and_missing_files(tmp_path):
    with pytest.raises(PosttrainError, match=r"chat\.jsonl:1: DPO needs preference pairs"):
        load([DataSource(path="builtin:chat")], "dpo")
    with pytest.raises(PosttrainError, match="nope.jsonl: no such file"):
        load([DataSource(path=str(tmp_path / "nope.jsonl"))], "sft")
    with pytest.raises(PosttrainError, match="no data"):
        load([], "sft")


def test_thinking_mode_fusion_marks_both_modes():
    data = load([DataSource(path="builtin:thinking", thinking="think", limit=3),
                 DataSource(path="builtin:chat", thinking="no_think", limit=3)], "sft")
    think = [r for r in data.rows if r["messages"][-2]["content"].endswith(" /think")]
    plain = [r for r in data.rows if r["messages"][-2]["content"].endswith(" /no_think")]
    assert len(think) == len(plain) == 3
    assert all(r["messages"][-1]["content"].startswith("<think>\n") and "</think>" in r["messages"][-1]["content"]
               and not r["messages"][-1]["content"].startswith(EMPTY_THINK) for r in think)
    assert all(r["messages"][-1]["content"].startswith(EMPTY_THINK) for r in plain)
    assert [r in think for r in data.rows] != [True] * 3 + [False] * 3  # interleaved, not concatenated
    with pytest.raises(PosttrainError, match="needs a <think>...</think> trace"):
        load([DataSource(path="builtin:chat", thinking="think", limit=1)], "sft")


def test_the_no_think_training_format_is_what_the_template_renders_without_thinking(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    row = load([DataSource(path="builtin:chat", thinking="no_think", limit=1)], "sft").rows[0]
    trained = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert trained.startswith(prompt)


def test_math_answer_reads_boxed_hashes_and_last_numbers():
    completions = ["so \\boxed{72}", "#### 1,000", "The answer is 5.", "3 then 4", "<think>7</think> it is 12",
                   [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}], "nothing", "\\boxed{71}"]
    assert rewards.math_answer(completions, ["72", "1000", "5", "4", "12", "0.5", "3", "72"]) == \
        [1, 1, 1, 1, 1, 1, 0, 0]
    assert rewards.math_answer(["42"], [None]) == [None]  # no reference: the reward does not apply


def test_format_and_length_rewards():
    assert rewards.think_format(["<think>a</think> b", "<think></think> b", "b", "<think>a</think>",
                                 "<think>a</think><think>b</think> c"]) == [1, 0, 0, 0, 0]
    assert rewards.length_penalty(["a" * 10, "a" * 1500, "a" * 5000], max_chars=1000) == [0, -0.5, -1]


def test_code_rewards_run_tests_in_a_sandbox_without_network_or_runaways():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    ok = "def add(a, b):\n    return a + b\n"
    completions = [f"Here:\n```python\n{ok}```", "def add(a, b): return a - b",
                   "x = bytearray(3 * 1024**3)\n" + ok,
                   f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + ok,
                   "import os\nos.fork()\n" + ok, "def add(a, b) return"]
    tests = "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    # Time to spare for the ones that pass (a sandboxed job runs at nice 19); the runaway gets 2 s.
    scores = rewards.code_tests(completions, [tests] * len(completions), timeout_s=30, memory_mb=256)
    assert scores == [1.0, 0.5, 0.0, 0.0, 1.0, 0.0]
    assert rewards.code_tests(["while True: pass"], [tests], timeout_s=2, memory_mb=256) == [0.0]
    assert rewards.code_tests([ok], [None]) == [None]
    listener.close()


def test_rewards_by_name():
    assert rewards.make("length_penalty", max_chars=2)(["abcd"]) == [-1.0]
    with pytest.raises(PosttrainError, match="unknown reward 'nope'"):
        rewards.make("nope")


def test_csv_cells_are_text_and_errors_name_the_line(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\nWhat is 6 x 7?,42\n"Say ""hi""\non two lines",hi\n,\n')
    rows = load([DataSource(path=str(path))], "sft").rows
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "42"}  # not the number 42
    assert rows[1]["messages"][0]["content"] == 'Say "hi"\non two lines'
    path.write_text('prompt,completion\n"a\nb",c\nq\n')
    with pytest.raises(PosttrainError, match=rf"^{path}:4: 1 cells, but the header names 2 columns$"):
        load([DataSource(path=str(path))], "sft")


def test_a_saved_datasets_folder_is_hashed_into_the_lineage(fresh_registry, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([json.loads(CHAT)] * 2).save_to_disk(str(folder))
    data = load([DataSource(path=str(folder))], "sft")
    assert len(data.rows) == 2 and data.sources == [folder]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    row = fresh_registry.add("m", tmp_path / "m", stage="sft", datasets=data.sources)
    assert row.datasets[0]["path"] == str(folder) and len(row.datasets[0]["sha256"]) == 64


class FakeBuilder:
    """What `datasets.load_dataset_builder` gives for a Hub dataset, without the Hub."""

    def __init__(self, name, hash):
        self.hash = hash

    def download_and_prepare(self):
        pass

    def as_dataset(self, split):
        import datasets

        return datasets.Dataset.from_list([json.loads(CHAT)])


@pytest.mark.parametrize("hash, lineage", [
    ("0123456789abcdef0123456789abcdef01234567", {"revision": "0123456789abcdef0123456789abcdef01234567"}),
    (None, {"unhashed": "datasets did not say which Hub commit it read"}),
])
def test_a_hub_dataset_records_its_revision_or_says_unhashed(monkeypatch, hash, lineage):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name: FakeBuilder(name, hash))
    data = load([DataSource(path="org/chat")], "sft")
    assert data.sources == [{"path": "org/chat", "split": "train", **lineage}]
