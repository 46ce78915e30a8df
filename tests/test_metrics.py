"""Tests of speechbrain_blspkd.metrics."""

import json

import pytest
import torch

from speechbrain_blspkd import metrics


def test_normalize_punctuation_case_whitespace():
    text = "  Hello,\tWORLD!!  It's   a well-known “fact”… "
    assert metrics.normalize_text(text) == "hello world its a well known fact"
    # NFKC: full-width letters and ligatures fold to ASCII
    assert metrics.normalize_text("ＡＢＣ ﬁne") == "abc fine"
    assert metrics.normalize_text(None) == ""
    assert metrics.normalize_text("?!.") == ""


def test_normalize_and_tokenize_cjk():
    assert metrics.normalize_text("你好，世界。", "zh") == "你好世界"
    assert metrics.normalize_text("我 爱 你", "zh-CN") == "我爱你"
    # CJK kept (not stripped) in any language
    assert metrics.normalize_text("Hi 你好!", "en") == "hi 你好"
    tokens = metrics.tokenize(
        metrics.normalize_text("我用 Python 3!", "zh"), "zh"
    )
    assert tokens == ["我", "用", "python", "3"]
    assert metrics.tokenize("a b", "en") == ["a", "b"]


def test_wer_hand_computed():
    # ref 5 words; hyp has one substitution (sat->sit) and one deletion (the)
    out = metrics.wer(["The cat sit on mat."], ["the cat sat on the mat"])
    assert out["sub"] == 1
    assert out["del"] == 1
    assert out["ins"] == 0
    assert out["num_words"] == 6
    assert out["wer"] == pytest.approx(100 * 2 / 6)
    (detail,) = out["details"]
    assert detail["hyp"] == "the cat sit on mat"
    assert detail["ref"] == "the cat sat on the mat"
    assert detail["id"] == "0"


def test_wer_empty_and_ids():
    out = metrics.wer(
        ["", "extra words", ""], ["one two", "", ""], ids=list("abc")
    )
    assert out["del"] == 2 and out["ins"] == 2 and out["sub"] == 0
    assert out["num_words"] == 2
    assert out["wer"] == pytest.approx(200.0)
    assert [d["id"] for d in out["details"]] == ["a", "b", "c"]
    assert out["details"][2]["wer"] == 0.0
    # no reference words at all
    assert metrics.wer([""], [""])["wer"] == 0.0
    assert metrics.wer(["x"], [""])["wer"] == 100.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.wer(["a", "b"], ["a"])


def test_wer_chinese_is_per_character():
    out = metrics.wer(["我爱北京"], ["我爱南京"], language="zh")
    assert out["num_words"] == 4 and out["sub"] == 1
    assert out["wer"] == pytest.approx(25.0)


def test_chrf_bleu():
    hyps = ["the quick brown fox", "jumps over the lazy dog"]
    assert metrics.chrf(hyps, hyps) == pytest.approx(100.0)
    assert metrics.bleu(hyps, hyps) == pytest.approx(100.0)
    worse = ["a slow red cat", "sleeps under a busy cow"]
    assert metrics.chrf(worse, hyps) < 50.0
    assert metrics.bleu(worse, hyps) < 10.0
    zh = ["我们今天去公园散步", "他喜欢读书和写字"]
    assert metrics.bleu(zh, zh, language="zh") == pytest.approx(100.0)
    # zh tokenisation scores characters (13a would see one token and give 0)
    assert (
        metrics.bleu(["我们今天去公园散步"], ["我们今天去公园跑步"], "zh") > 0
    )


def test_derangement_has_no_fixed_point():
    for n in range(2, 12):
        for seed in range(5):
            perm = metrics.derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert all(p != i for i, p in enumerate(perm))
    assert metrics.derangement(7, 3) == metrics.derangement(7, 3)
    with pytest.raises(ValueError):
        metrics.derangement(1)


def test_parity_agreement():
    texts = [
        "the weather is sunny and warm today",
        "please pass me the salt",
        "trains leave every hour from platform two",
        "my favourite colour is green",
    ]
    out = metrics.parity_agreement(texts, texts, seed=0)
    assert out["n"] == 4
    assert out["chrf"] == pytest.approx(100.0)
    assert out["wer"] == 0.0
    assert out["shuffled_chrf"] < out["chrf"]
    assert out["shuffled_wer"] > out["wer"]
    single = metrics.parity_agreement(["a b"], ["a c"])
    assert single["shuffled_chrf"] is None and single["shuffled_wer"] is None
    assert single["wer"] == pytest.approx(50.0)


def test_exact_count():
    pred = torch.tensor([3, 5, 7, 2])
    true = torch.tensor([3, 4, 7, 4])
    assert metrics.exact_count_rate(pred, true) == pytest.approx(0.5)
    assert metrics.mean_abs_count_error(pred, true) == pytest.approx(0.75)
    stats = metrics.count_stats([1, 2], [1, 2])
    assert stats == {
        "exact_rate": 1.0,
        "mean_abs_error": 0.0,
        "mean_error": 0.0,
        "n": 2,
    }
    with pytest.raises(ValueError):
        metrics.exact_count_rate([1], [1, 2])


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
def test_nearest_token_accuracy(metric):
    vocab, dim, k = 500, 32, 64
    table = torch.randn(vocab, dim)
    target = torch.randint(0, vocab, (k,))
    outputs = table[target] + 0.01 * torch.randn(k, dim)
    # tiny chunks exercise the chunk merging across vocabulary and rows
    acc = metrics.nearest_token_accuracy(
        outputs, table, target, metric=metric, row_chunk=7, vocab_chunk=37
    )
    assert acc == 1.0
    rand = metrics.nearest_token_accuracy(
        torch.randn(k, dim), table, target, metric
    )
    assert rand < 0.2


def test_nearest_tokens_matches_full_search():
    table = torch.randn(300, 16)
    outs = torch.randn(40, 16)
    full = torch.cdist(outs, table).argmin(-1)
    chunked = metrics.nearest_tokens(
        outs, table, metric="l2", row_chunk=9, vocab_chunk=50
    )
    assert torch.equal(full, chunked)
    cos = torch.nn.functional.normalize(outs, dim=-1) @ (
        torch.nn.functional.normalize(table, dim=-1).T
    )
    assert torch.equal(
        cos.argmax(-1), metrics.nearest_tokens(outs, table, vocab_chunk=64)
    )
    with pytest.raises(ValueError, match="dimension"):
        metrics.nearest_tokens(outs, torch.randn(5, 8))


def test_collapse_rate():
    table = torch.randn(100, 8)
    collapsed = table[3].expand(20, 8) + 0.001 * torch.randn(20, 8)
    ids = metrics.nearest_tokens(collapsed, table)
    assert metrics.collapse_rate(ids) == 1.0
    assert metrics.collapse_rate([1, 2, 3, 4]) == 0.25
    assert metrics.collapse_rate(torch.tensor([7, 7, 1, 7, 2])) == 0.6


def test_spoken_qa_accuracy():
    out = metrics.spoken_qa_accuracy(
        ["The answer is Paris!", "i know", "Blue.", "它是北京"],
        [["paris", "Paris, France"], ["no"], "blue", ["北京"]],
    )
    # "no" must not match inside "know"; with language "en" the zh answer
    # must be a whole space-separated word (it is not)
    assert out["correct"] == [True, False, True, False]
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["exact_match"] == pytest.approx(0.25)
    zh = metrics.spoken_qa_accuracy(["它是北京。"], [["北京"]], language="zh")
    assert zh["accuracy"] == 1.0 and zh["exact_match"] == 0.0
    with pytest.raises(ValueError, match="item 0"):
        metrics.spoken_qa_accuracy(["x"], [["?"]])


def _rows(ids, task="asr"):
    return [
        {"id": i, "task": task, "hyp": f"word {i}", "ref": f"word {i}"}
        for i in ids
    ]


def test_eval_summary_write_and_merge(tmp_path):
    shards = [_rows(["u3", "u1"]), _rows(["u2", "u0", "u1"])]  # u1 duplicated
    merged = metrics.EvalSummary.merge(shards)
    assert [r["id"] for r in merged.rows] == ["u0", "u1", "u2", "u3"]
    # order of shards does not matter
    again = metrics.EvalSummary.merge(shards[::-1])
    assert again.rows == merged.rows

    merged.add(
        id="p0", task="parity", hyp="a red car", teacher="a red car", ref=None
    )
    merged.add(id="p1", task="parity", hyp="big dog", teacher="small cat")
    merged.add(id="q0", task="qa", hyp="It is Paris", answers=["paris"])
    rows_path, summary_path = tmp_path / "r.jsonl", tmp_path / "s.json"
    merged.write(rows_path, summary_path, extra={"model": "x"})

    lines = rows_path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [
        "p0",
        "p1",
        "q0",
        "u0",
        "u1",
        "u2",
        "u3",
    ]
    assert metrics.EvalSummary.load_rows(rows_path) == merged.rows
    summary = json.loads(summary_path.read_text())
    assert summary["model"] == "x"
    assert summary["asr"]["wer"] == 0.0 and summary["asr"]["n"] == 4
    assert summary["parity"]["parity_n"] == 2
    # 2 substitutions over 3 + 2 teacher words
    assert summary["parity"]["parity_wer"] == pytest.approx(40.0)
    assert summary["qa"]["qa_accuracy"] == 1.0
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(ValueError, match="conflicting rows for id 'u1'"):
        merged.add(id="u1", task="asr", hyp="other", ref="word u1")
    with pytest.raises(ValueError, match="without 'id'"):
        merged.add(task="asr")


def test_eval_summary_groups_languages_and_tensors(tmp_path):
    s = metrics.EvalSummary(
        [
            {
                "id": "a",
                "task": "asr",
                "language": "en",
                "hyp": "a",
                "ref": "a",
            },
            {
                "id": "b",
                "task": "asr",
                "language": "zh",
                "hyp": "我",
                "ref": "你",
            },
            {
                "id": "c",
                "task": "st",
                "hyp": "x",
                "ref": "x",
                "n": torch.tensor(3),
            },
        ]
    )
    summary = s.summarize()
    assert set(summary) == {"asr/en", "asr/zh", "st"}
    assert summary["asr/zh"]["wer"] == 100.0
    s.write_rows(tmp_path / "r.jsonl")
    assert metrics.EvalSummary.load_rows(tmp_path / "r.jsonl")[2]["n"] == 3


def test_positional_token_accuracy_counts_a_shift_as_errors():
    target = [[10, 11, 12, 13, 14]]
    # the true count: plain share of correct positions
    same = metrics.positional_token_accuracy([[10, 11, 99, 13, 14]], target)
    assert (same["correct"], same["positions"]) == (4, 5)
    # one token missing at position 1: the three later ones are right but
    # one place early, so they count as errors, and so does the gap
    missing = metrics.positional_token_accuracy([[10, 12, 13, 14]], target)
    assert (missing["correct"], missing["positions"]) == (1, 5)
    assert missing["accuracy"] == pytest.approx(0.2)
    # an extra token at the end is scored as an error (max(N^, N) positions)
    extra = metrics.positional_token_accuracy(
        [[10, 11, 12, 13, 14, 15]], target
    )
    assert (extra["correct"], extra["positions"]) == (5, 6)
    # summed over utterances, not averaged per utterance
    both = metrics.positional_token_accuracy(
        [[10, 12, 13, 14], [7]], target + [[7]]
    )
    assert both["accuracy"] == pytest.approx(2 / 6)
    assert both["n"] == 2
    # tensors or lists, and an empty prediction scores only errors
    empty = metrics.positional_token_accuracy([[]], [torch.tensor([1, 2])])
    assert (empty["correct"], empty["positions"]) == (0, 2)
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        metrics.positional_token_accuracy([[1]], [[1], [2]])


def test_token_error_rate_counts_a_shift_once():
    target = [[10, 11, 12, 13, 14]]
    # one token missing at position 1: one deletion, where the positional
    # accuracy loses four of five positions
    missing = metrics.token_error_rate([[10, 12, 13, 14]], target)
    assert (missing["deletions"], missing["substitutions"]) == (1, 0)
    assert missing["ter"] == pytest.approx(1 / 5)
    # an extra token and a wrong one
    out = metrics.token_error_rate([[10, 11, 99, 13, 14, 15]], target)
    assert (out["substitutions"], out["insertions"], out["deletions"]) == (
        1,
        1,
        0,
    )
    assert out["ter"] == pytest.approx(2 / 5)
    # summed over utterances (errors over all true tokens), tensors or
    # lists, and an empty prediction deletes every token
    both = metrics.token_error_rate(
        [[10, 12, 13, 14], []], target + [torch.tensor([7, 8])]
    )
    assert (both["ter"], both["tokens"], both["n"]) == (3 / 7, 7, 2)
    # at equal counts it is one minus the positional accuracy
    same = [[10, 11, 99, 13, 98]]
    assert metrics.token_error_rate(same, target)["ter"] == pytest.approx(
        1 - metrics.positional_token_accuracy(same, target)["accuracy"]
    )
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        metrics.token_error_rate([[1]], [[1], [2]])


def test_vocabulary_coverage_hand_case():
    train = [[1, 2, 3], [3, 4]]
    test = [[1, 1, 5], [4, 6, 6, 6]]
    out = metrics.vocabulary_coverage(test, train)
    # occurrences: 1, 1, 4 seen; 5, 6, 6, 6 not -> 3 / 7
    assert out["token_coverage"] == pytest.approx(3 / 7)
    # distinct: {1, 4} of {1, 4, 5, 6}
    assert out["type_coverage"] == pytest.approx(0.5)
    assert (out["tokens"], out["types"], out["unseen_types"]) == (7, 4, [5, 6])
    assert metrics.vocabulary_coverage([[2]], train)["token_coverage"] == 1.0
    with pytest.raises(ValueError, match="no test tokens"):
        metrics.vocabulary_coverage([[]], train)
