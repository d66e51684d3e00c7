"""Data in the formats users keep it in, read through HF `datasets`: verl's parquet layout unchanged, TRL's
`save_to_disk` directories, CSV and JSON files, with a column mapping; a bad row still names file and row
and follows data.on_bad_row (issue 23). The slow test trains 2 steps on all three through a recipe."""
import json
import random
import subprocess
import sys
import tracemalloc

import datasets
import pytest

from cispo import checkpoint
from cispo.collect import encode_prompt
from cispo.config import RecipeError, load_recipe
from cispo.sections import DataConfig, SourceConfig
from cispo.data import PromptSource, Stream, read_rows
from cispo.loop import train
from cispo.metrics import read_metrics
from rollout.model import build_char_tokenizer
from tests.conftest import M1_TWO_LAYERS, REPO, save_tiny_model

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def brief_parquet_stream_ends(monkeypatch):
    """datasets sleeps 5 s each time a streamed parquet file's iterator ends (an epoch's end, a resume's seek:
    its config.SLEEP_TIME_ON_THREADS_SHUTDOWN, a grace for Arrow's reader threads, apache/arrow#45214). These
    streams are a few rows long and end dozens of times (45 s of sleep in all), so they get 0.1 s (what that
    issue's thread found to be enough)."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)


def verl_row(i: int, a: int, b: int) -> dict:
    """A row as verl's examples/data_preprocess/gsm8k.py writes it."""
    return {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"{a}+{b}="}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": "train", "index": i, "answer": str(a + b)}}


def write_verl(path, n: int = 12, bad: dict | None = None):
    rows = [verl_row(i, i, i + 1) for i in range(n)]
    if bad is not None:
        rows[1] = bad
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def write_trl(path, n: int = 12):
    """TRL's layout: a Dataset saved with save_to_disk, columns named as the user's data names them."""
    datasets.Dataset.from_list([{"question": f"{i}+2=", "solution": str(i + 2)} for i in range(n)]).save_to_disk(str(path))
    return path


def write_csv(path, n: int = 12):
    lines = ["prompt,answer,origin"] + [f"{i}+0{i % 3}=,00{i + i % 3},{'csv-a' if i % 2 else 'csv-b'}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_verl_parquet_loads_unchanged(tmp_path):
    prompts, skipped = read_rows(write_verl(tmp_path / "train.parquet"), "verl", "mix-name")
    assert skipped == 0 and len(prompts) == 12
    p = prompts[3]
    assert (p.text, p.answer, p.source) == ("3+4=", "7", "openai/gsm8k")  # the row's data_source, not the mix name
    assert p.messages == ({"role": "user", "content": "3+4="},)
    assert p.fields["extra_info"] == {"split": "train", "index": 3, "answer": "7"} and p.fields["ability"] == "math"
    # the chat messages go through the tokenizer's chat template, as verl encodes them
    tok = build_char_tokenizer("0123456789+=<>abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(RecipeError, match="prompts are chat messages but the tokenizer has no chat template"):
        encode_prompt(tok, p.text, messages=p.messages)
    tok.chat_template = TEMPLATE
    assert tok.decode(encode_prompt(tok, p.text, messages=p.messages)) == "<user>3+4=<assistant>"


def test_a_save_to_disk_directory_with_a_column_mapping(tmp_path):
    path = write_trl(tmp_path / "trl")
    prompts, _ = read_rows(path, "jsonl", "trl", columns={"prompt": "question", "answer": "solution"})
    assert [(p.text, p.answer, p.source) for p in prompts[:2]] == [("0+2=", "2", "trl"), ("1+2=", "3", "trl")]
    assert prompts[0].fields == {"question": "0+2=", "solution": "2"}  # the columns as the file names them
    with pytest.raises(RecipeError, match=r"no column 'problem' \(columns.prompt\); it has question, solution"):
        read_rows(path, "jsonl", columns={"prompt": "problem"})
    datasets.DatasetDict({"train": datasets.load_from_disk(str(path)), "test": datasets.load_from_disk(str(path))}
                         ).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(RecipeError, match=r"splits holds the splits train, test: name one, e.g. .*splits/train"):
        read_rows(tmp_path / "splits")
    assert len(read_rows(tmp_path / "splits/train", columns={"prompt": "question", "answer": "solution"})[0]) == 12


def test_csv_keeps_text_as_written_and_a_source_column_names_each_rows_source(tmp_path):
    prompts, _ = read_rows(write_csv(tmp_path / "rows.csv"), "jsonl", "csv", columns={"source": "origin"})
    assert [(p.text, p.answer, p.source) for p in prompts[:2]] == [("0+00=", "000", "csv-b"), ("1+01=", "002", "csv-a")]
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "rows.csv"), columns={"source": "origin"}, eval_size=2)
    assert {p.source for p in PromptSource(cfg, 0).batch(1, 8)} == {"csv-a", "csv-b"}


def test_json_and_arrow_files(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"problem": "1+1=", "solution": "so \\boxed{2}"}]))
    assert read_rows(tmp_path / "rows.json", "math")[0][0].answer == "2"
    arrow = write_trl(tmp_path / "trl", n=3)
    [file] = arrow.glob("*.arrow")
    assert [p.answer for p in read_rows(file, columns={"prompt": "question", "answer": "solution"})[0]] == ["2", "3", "4"]


def test_a_bad_row_names_file_and_row_and_follows_on_bad_row(tmp_path):
    bad = {**verl_row(1, 1, 2), "prompt": []}  # no messages
    path = write_verl(tmp_path / "train.parquet", bad=bad)
    with pytest.raises(RecipeError, match=r"train.parquet:row 1: bad verl row \(ValueError: 'prompt' is not a list of "
                                          r"chat messages.*data.on_bad_row=skip"):
        read_rows(path, "verl")
    prompts, skipped = read_rows(path, "verl", skip_bad=True)
    assert (len(prompts), skipped) == (11, 1)
    cfg = DataConfig(sources=[SourceConfig(name="v", format="verl", path=str(path))], on_bad_row="skip")
    assert PromptSource(cfg, 0).skipped == {str(path): 1}
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,answer\n1+1=,2\n,3\n")  # an empty cell: never the prompt "None"
    with pytest.raises(RecipeError, match=r"bad.csv:row 1: bad jsonl row \(ValueError: null prompt or answer\)"):
        read_rows(csv)


def test_what_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "rows.txt").write_text("1+1=\n")
    with pytest.raises(RecipeError, match=r"rows.txt: unknown data file type; valid: .jsonl, .jsonl.gz, .json, .csv"):
        read_rows(tmp_path / "rows.txt")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(RecipeError, match=r"broken.parquet: cannot read it: ") as err:
        read_rows(tmp_path / "broken.parquet", "verl")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="data file not found"):
        read_rows(tmp_path / "none.parquet")


def test_a_table_stays_on_disk_and_prompts_are_built_when_drawn(tmp_path):
    """For files larger than memory: the table is memory-mapped, so reading 16 MB of prompts keeps well
    under 1 MB of Python objects (a list of Prompts held them all), and draws see the same prompts."""
    big = "7" * 8000
    rows = [{"prompt": f"{i}+{big}=", "answer": str(i)} for i in range(2000)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "big.parquet"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        prompts, _ = read_rows(tmp_path / "big.parquet", source="big")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(prompts) == 2000 and held < 1_000_000, held
    assert [(p.text, p.answer) for p in prompts[5:7]] == [(r["prompt"], r["answer"]) for r in rows[5:7]]
    assert [p.answer for p in random.Random(1).sample(prompts, 3)] == [r["answer"] for r in random.Random(1).sample(rows, 3)]


def test_reward_sources_may_name_a_rows_own_source_only_when_the_data_names_them():
    per_row = "data.sources=[{name: v, format: verl, path: x.parquet}]"
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", [per_row, "reward.sources={openai/gsm8k: math}"])
    assert recipe.reward.sources == {"openai/gsm8k": "math"}
    with pytest.raises(RecipeError, match="reward.sources: 'openai/gsm8k' is not a data source"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["reward.sources={openai/gsm8k: math}"])
    with pytest.raises(RecipeError, match="key 'data.columns.question'"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["data.columns={question: q}"])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random tiny hybrid (M1's two layer kinds, tests/conftest.py) whose tokenizer has a chat template (verl's
    prompts are chat messages)."""
    tok = build_char_tokenizer("0123456789+=<>abcdefghijklmnopqrstuvwxyz\\{}")
    tok.chat_template = TEMPLATE
    return save_tiny_model(tok, tmp_path_factory.mktemp("chat-model"), **M1_TWO_LAYERS)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_verl_parquet_save_to_disk_and_csv_each_train_2_steps_through_a_recipe(ray_session, chat_model, tmp_path,
                                                                                streaming):
    """One recipe mixing the three, so every step draws from each: verl's rows encoded with the chat template
    and scored by a verl compute_score routed by their data_source (any other route would be a counted
    error, and so would verl's fields not reaching it), TRL's directory and the CSV through column mappings, scored by math-verify.
    Read whole, and read as streams (data.streaming); streamed, a run resumed after step 2 draws its step 3
    where an uninterrupted source would (the checkpoint holds where each stream stands)."""
    verl, trl, csv = write_verl(tmp_path / "verl.parquet"), write_trl(tmp_path / "trl"), write_csv(tmp_path / "r.csv")
    sources = (f"[{{name: verl, format: verl, path: {verl}, eval_path: {verl}}}, "
               f"{{name: trl, path: {trl}, eval_path: {trl}, columns: {{prompt: question, answer: solution}}}}, "
               f"{{name: csv, path: {csv}, eval_path: {csv}, columns: {{source: origin}}}}]")
    def recipe(run: str, steps: int, *more: str):
        return load_recipe(REPO / "recipes/tiny-arith.yaml", [
            f"data.sources={sources}", f"model.path={chat_model}", "data.eval_size=2", "data.prompts_per_step=12",
            "reward.sources={openai/gsm8k: tests.rewards.user_rewards:verl_length_parity}", "rollout.n_samples=4",
            "rollout.max_new_tokens=6", "sft.steps=0", "algorithm.dynamic_sampling=false", f"run.max_steps={steps}",
            "run.threads=1", "wandb.mode=disabled", f"run.dir={tmp_path / run}", f"data.streaming={streaming}", *more])
    first = recipe("run", 2)
    source = PromptSource(first.data, first.run.seed)
    drawn = [source.batch(step, stream="rl0") for step in (1, 2)]  # what steps 1-2 train on (the collector's draw)
    assert {p.source for batch in drawn for p in batch} == {"openai/gsm8k", "trl", "csv-a", "csv-b"}  # every file
    summary = train(first)
    rows = read_metrics(tmp_path / "run")
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert all(r["reward_error"] == 0 and r["reward_sandbox_error"] == 0 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)  # the verl rows' rewards differ within a group: a real update
    if streaming:  # each checkpoint holds where the streams stand, and a resumed run draws on from there
        assert checkpoint.latest(tmp_path / "run")[1]["data_position"] == source.position()
        train(recipe("run", 3, "run.resume=true"))
        source.batch(3, stream="rl0")
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
        assert checkpoint.latest(tmp_path / "run")[1]["data_position"] == source.position()


def test_a_streamed_file_gives_each_good_row_once_per_epoch_in_a_seeded_order(tmp_path):
    """data.streaming: rows in a shuffle-buffer order that the seed fixes, every row once per epoch, the
    next epoch in another order; the same for JSONL, parquet and CSV."""
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    write_csv(tmp_path / "r.csv")
    for name in ("r.jsonl", "r.parquet", "r.csv"):
        first, again = (Stream(tmp_path / name, "jsonl", "s", False, {}, seed=3, buffer=100) for _ in range(2))
        epoch1, epoch2 = [p.text for p in first.take(12)], [p.text for p in first.take(5)] + [p.text for p in first.take(7)]
        assert sorted(epoch1) == sorted(epoch2) == sorted(p.text for p in read_rows(tmp_path / name)[0]), name
        assert epoch1 != sorted(epoch1, key=lambda t: int(t.split("+")[0])) and epoch2 != epoch1, name
        assert [p.text for p in again.take(12)] == epoch1, name
    assert [p.source for p in Stream(tmp_path / "r.csv", "jsonl", "csv", False, {"source": "origin"}, 0, 4).take(2)] \
        != ["csv", "csv"]  # a mapped source column names each row's source, as read_rows does


def test_a_streamed_bad_row_names_file_and_row_and_follows_on_bad_row(tmp_path):
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(6)]
    lines[2] = '{"prompt": "2+1=", '  # line 3: cut short
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n\n")  # and a blank line, which is no row
    with pytest.raises(RecipeError, match=r"r.jsonl:3: bad jsonl row \(JSONDecodeError: .*data.on_bad_row=skip"):
        Stream(tmp_path / "r.jsonl", "jsonl", "s", False, {}, 0, 100).take(6)
    stream = Stream(tmp_path / "r.jsonl", "jsonl", "s", True, {}, 0, buffer=1)  # a buffer of 1: the file's order
    assert [p.text for p in stream.take(10)] == [f"{i}+1=" for i in (0, 1, 3, 4, 5)] * 2 and stream.skipped == 2
    path = write_verl(tmp_path / "train.parquet", bad={**verl_row(1, 1, 2), "prompt": []})
    with pytest.raises(RecipeError, match=r"train.parquet:row 1: bad verl row \(ValueError: 'prompt' is not a list"):
        Stream(path, "verl", "v", False, {}, 0, 100).take(12)
    with pytest.raises(RecipeError, match=r"r.parquet: no column 'problem' \(columns.prompt\); it has prompt"):
        datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]).to_parquet(str(tmp_path / "r.parquet"))
        Stream(tmp_path / "r.parquet", "jsonl", "s", False, {"prompt": "problem"}, 0, 100)
    (tmp_path / "all-bad.jsonl").write_text("{\n")
    with pytest.raises(RecipeError, match=r"all-bad.jsonl: no good rows to stream \(1 bad rows skipped\)"):
        Stream(tmp_path / "all-bad.jsonl", "jsonl", "s", True, {}, 0, 100).take(1)


def test_a_streamed_source_resumes_at_its_checkpointed_position_without_a_prompt_skipped_or_repeated(tmp_path):
    """A stream is stateful (its next rows), not a function of the step: a resumed run must go on from the
    position its checkpoint holds (JSON, as the checkpoint's marker keeps it), across epochs and bad rows."""
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(11)] + ["{"]  # a bad row
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "r.jsonl"), eval_path=str(tmp_path / "r.jsonl"),
                     eval_size=1, streaming=True, shuffle_buffer=4, on_bad_row="skip")
    whole = PromptSource(cfg, 5)
    seen = [[p.text for p in whole.batch(step, 4)] for step in range(1, 9)]  # 32 draws: about 3 epochs of 11
    for stop in (2, 3, 5):  # mid-epoch, at an epoch's end, past two epochs
        first = PromptSource(cfg, 5)
        before = [[p.text for p in first.batch(step, 4)] for step in range(1, stop + 1)]
        position = json.loads(json.dumps(first.position()))
        resumed = PromptSource(cfg, 5)
        resumed.seek(position)
        after = [[p.text for p in resumed.batch(step, 4)] for step in range(stop + 1, 9)]
        assert before + after == seen, stop
        assert resumed.position() == whole.position(), stop  # the bad row's count too (data_rows_skipped)
    drawn = [t for batch in seen for t in batch]
    assert all(sorted(drawn[e * 11:(e + 1) * 11]) == sorted(f"{i}+1=" for i in range(11)) for e in range(2))


def test_a_streamed_file_is_read_as_drawn(tmp_path):
    """For files larger than memory: drawing 4 prompts from a 16 MB JSONL stream holds about the shuffle
    buffer's rows (50 of 2000, 8 kB each), where reading it whole holds every line; a PromptSource with
    data.streaming draws its batches from the stream (held-out rows still read whole)."""
    big = "7" * 8000
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{big}=", "answer": str(i)}) + "\n"
                                                for i in range(2000)))
    # In a process of its own: tracemalloc counts every thread's allocations, and a pytest worker holds
    # other tests' threads (Ray's driver, scorer pools) that allocate while it measures. A first draw
    # imports what streaming imports lazily (110 MB of modules, which would otherwise count).
    measure = ("import json, sys, tracemalloc\nfrom cispo.data import Stream, read_rows\n"
               "stream = lambda: Stream(sys.argv[1], 'jsonl', 'big', False, {}, 0, 50)\n"
               "stream().take(1)\ntracemalloc.start()\ndrawn = stream().take(4)\n"
               "streamed = tracemalloc.get_traced_memory()[1]\ntracemalloc.reset_peak()\nread_rows(sys.argv[1])\n"
               "print(json.dumps([len(drawn), streamed, tracemalloc.get_traced_memory()[1]]))")
    out = subprocess.run([sys.executable, "-c", measure, str(tmp_path / "big.jsonl")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    drawn, streamed, whole = json.loads(out.stdout.splitlines()[-1])
    assert drawn == 4 and streamed < 2_000_000 < 16_000_000 < whole, (streamed, whole)
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "big.jsonl"), eval_path=str(tmp_path / "big.jsonl"),
                     eval_size=3, streaming=True, shuffle_buffer=50)
    source = PromptSource(cfg, 0)
    batches = [p.answer for p in source.batch(1, 8)] + [p.answer for p in source.batch(2, 8)]
    assert len(set(batches)) == 16 and [p.answer for p in source.eval] == ["0", "1", "2"]
