"""Token Merging on the ViT student: the merge against the reference's formulation, token mass,
the class token, r = 0, the LSH matcher, export parity for r > 0, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, write_recipe
from edgekd.cli import app
from edgekd.data import gather, load_dataset
from edgekd.recipe import DataConfig
from edgekd.tome import apply_tome, bipartite_soft_matching, check_r, merge_wavg, tokens_after
from edgekd.tome.patch import lsh_planes

pytest.importorskip("timm")


def small_vit(seed: int = 0, image_size: int = 28):
    from edgekd.models import build_model

    torch.manual_seed(seed)
    return build_model("vit", 10, 1, image_size, embed_dim=32, depth=4, num_heads=2, patch_size=4).eval()


def real_images(n: int = 32, image_size: int = 28) -> torch.Tensor:
    data = load_dataset(DataConfig(train_subset=50, test_subset=max(n, 10), image_size=image_size), seed=0)
    images, _ = gather(data.test)
    return (images[:n].float() / 255 - 0.286) / 0.353


def reference_merge(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> tuple:
    """facebookresearch/ToMe's bipartite_soft_matching + merge_wavg (class token protected),
    written from the paper's algorithm with gather / scatter_reduce as the reference does."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged_x, merged_size = merge(x * size), merge(size)
    return merged_x / merged_size, merged_size


@pytest.mark.parametrize("form", ["gather", "matmul"])  # PyTorch's form and the exported one
@pytest.mark.parametrize("tokens,r", [(50, 1), (50, 8), (50, 24), (65, 16), (17, 8)])
def test_merge_equals_reference_formulation(tokens: int, r: int, form: str) -> None:
    torch.manual_seed(tokens + r)
    metric, x = torch.randn(3, tokens, 16), torch.randn(3, tokens, 24)
    size = torch.randint(1, 4, (3, tokens, 1)).float()
    want_x, want_size = reference_merge(metric, x, size, r)
    got_x, got_size = merge_wavg(bipartite_soft_matching(metric, r, class_token=True, form=form), x, size)
    assert got_x.shape == (3, tokens - r, 24)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_size, want_size)


@pytest.mark.parametrize("tokens,r", [(197, 16), (785, 8)])
def test_the_exported_form_breaks_ties_as_the_gather_form(tokens: int, r: int) -> None:
    """The matmul form finds maxima and ranks with float step functions: equal scores (identical
    keys, 2-bit LSH codes) must still pick one B token per A token and exactly r edges, the same as
    argmax and the sort (the lowest index first)."""
    torch.manual_seed(0)
    x = torch.randn(2, tokens, 8)
    planes = lsh_planes(16, 2)
    for metric, matcher in [(torch.ones(2, tokens, 16), "exact"), (torch.randn(2, tokens, 16), "lsh")]:
        want = merge_wavg(bipartite_soft_matching(metric, r, matcher=matcher, planes=planes, form="gather"), x, None)
        got = merge_wavg(bipartite_soft_matching(metric, r, matcher=matcher, planes=planes, form="matmul"), x, None)
        torch.testing.assert_close(got, want)
        assert torch.all(got[1].sum(dim=1) == tokens)  # no token added twice or lost


@pytest.mark.parametrize("matcher", ["exact", "lsh", "bucketed"])
@pytest.mark.parametrize("r", [2, 4, [0, 8, 4, 2]])
def test_token_mass_is_preserved_and_the_class_token_is_never_merged(matcher: str, r) -> None:
    model = apply_tome(small_vit(), r, matcher, bits=8)
    tokens, size = model.forward_tokens(real_images(8))
    schedule = r if isinstance(r, list) else [r] * 4
    assert tokens.shape[1] == tokens_after(50, schedule)[-1]
    assert torch.allclose(size.sum(dim=1), torch.full((8, 1), 50.0))  # every patch is in exactly one token
    assert torch.all(size[:, 0] == 1)  # the class token absorbed nothing


def test_class_token_survives_even_when_it_is_every_tokens_best_match() -> None:
    torch.manual_seed(0)
    metric = torch.randn(1, 11, 8)
    metric[:, 0] = metric[:, 1::2].mean(1)  # the class token looks like all of set B
    x = torch.randn(1, 11, 4)
    out, size = merge_wavg(bipartite_soft_matching(metric, 5, class_token=True), x, None)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    assert size[0, 0, 0] == 1


def test_r_zero_is_exactly_the_unpatched_model() -> None:
    plain = small_vit()
    x = real_images(8)
    with torch.no_grad():
        want = plain(x)
        got = apply_tome(copy.deepcopy(plain), 0)(x)
    assert torch.equal(got, want)
    assert set(plain.state_dict()) == set(apply_tome(copy.deepcopy(plain), 4).state_dict())  # timm's keys


def test_lsh_with_enough_bits_reproduces_exact_matching() -> None:
    torch.manual_seed(1)
    # keys with well-separated cosines: each B token is a noisy copy of one A token
    a = torch.nn.functional.normalize(torch.randn(1, 13, 32), dim=-1)
    b = a[:, :12] + 0.3 * torch.randn(1, 12, 32) * torch.linspace(0.2, 2.0, 12).view(1, 12, 1)
    metric = torch.stack([a[:, :12], b], dim=2).reshape(1, 24, 32)
    metric = torch.cat([metric, a[:, 12:]], dim=1)  # 25 tokens: A = even, B = odd
    x = torch.randn(1, 25, 6)
    exact = merge_wavg(bipartite_soft_matching(metric, 6), x, None)
    lsh = merge_wavg(bipartite_soft_matching(metric, 6, matcher="lsh", planes=lsh_planes(32, 8192)), x, None)
    few = merge_wavg(bipartite_soft_matching(metric, 6, matcher="lsh", planes=lsh_planes(32, 2)), x, None)
    torch.testing.assert_close(lsh[0], exact[0])
    assert not torch.allclose(few[0], exact[0])  # 2 bits cannot rank these pairs: the test can fail


def test_bucketed_matching_is_exact_matching_within_each_bucket() -> None:
    """One chunk holding every token is exact matching; with small chunks, each A token's partner
    is the best B token of its own chunk (brute force over the hash-sorted order)."""
    from edgekd.tome.merge import bucketed_best_match, match_scores

    torch.manual_seed(0)
    metric, x, planes = torch.randn(2, 197, 16), torch.randn(2, 197, 8), lsh_planes(16, 4)
    exact = merge_wavg(bipartite_soft_matching(metric, 16), x, None)
    whole = merge_wavg(bipartite_soft_matching(metric, 16, matcher="bucketed", planes=planes, bucket_size=256), x, None)
    torch.testing.assert_close(whole, exact)
    best, partner = bucketed_best_match(metric, planes, bucket_size=8)
    m = metric / metric.norm(dim=-1, keepdim=True)
    bucket = torch.cat([m @ planes, -(m @ planes)], dim=-1).argmax(-1)
    scores = match_scores(metric)
    for n in range(2):
        order = sorted(range(197), key=lambda i: (int(bucket[n, i]), i))
        chunk = {tok: k // 8 for k, tok in enumerate(order)}
        for i in range(0, 197, 2):
            mates = [j for j in range(1, 197, 2) if chunk[j] == chunk[i]]
            if not mates:
                assert best[n, i // 2] == -2.0
                continue
            want = max(mates, key=lambda j: float(scores[n, i // 2, j // 2]))
            assert int(partner[n, i // 2]) == want // 2
            torch.testing.assert_close(best[n, i // 2], scores[n, i // 2, want // 2])
    out, size = merge_wavg(bipartite_soft_matching(metric, 16, matcher="bucketed", planes=planes, bucket_size=8),
                           x, None)
    assert out.shape == (2, 181, 8) and torch.all(size.sum(dim=1) == 197)


def test_bucketed_matching_merges_every_b_token_it_may_when_chunks_lack_b_tokens() -> None:
    """A late block of a large r (DeiT-Ti's r = 16: 37 tokens, 18 in B, r = 16) merges A tokens whose
    chunk holds no B token: their partner must still be a B token (it crashed with an index past B)."""
    from edgekd.tome.merge import bucketed_best_match

    torch.manual_seed(0)
    for t in (37, 21, 9):
        metric, x, planes = torch.randn(4, t, 16), torch.randn(4, t, 8), lsh_planes(16, 8)
        best, partner = bucketed_best_match(metric, planes, bucket_size=4)
        assert bool((best == -2.0).any())  # the case exists at these sizes
        assert int(partner.max()) < t // 2 and int(partner.min()) >= 0
        r = t // 2 - 1
        out, size = merge_wavg(bipartite_soft_matching(metric, r, matcher="bucketed", planes=planes, bucket_size=4),
                               x, None)
        assert out.shape == (4, t - r, 8) and torch.all(size.sum(dim=1) == t)


def test_r_is_clamped_per_block_as_the_reference_does_and_refused_only_past_the_first_block() -> None:
    assert check_r(4, 50, 4) == [4, 4, 4, 4]
    # 50 tokens: the first block merges 16 (at most 24); then 34 -> 16, 18 -> 8 (half of 17), 10 -> 4
    assert check_r(16, 50, 4) == [16, 16, 8, 4]
    assert tokens_after(50, check_r(16, 50, 4)) == tokens_after(50, [16] * 4)
    # DeiT-Ti's token count and depth: the paper's r = 16 runs; its last block has 21 tokens and merges 10
    assert check_r(16, 197, 12) == [16] * 11 + [10]
    assert check_r(24, 50, 4)[0] == 24
    with pytest.raises(Exception, match=r"ToMe r=25 is too large: the first block sees 50 tokens, so at most 24 "
                                        r"can merge there; use r <= 24 \(r <= 9 merges"):
        check_r(25, 50, 4)


@pytest.mark.e2e
@pytest.mark.parametrize("matcher", ["exact", "lsh", "bucketed"])
def test_exported_onnx_matches_pytorch_for_r_above_zero(tmp_path, matcher: str) -> None:
    from edgekd.export import export_onnx, onnx_runner

    model = apply_tome(small_vit(), 6, matcher, bits=16)
    x = real_images(32)
    export_onnx(model, x[:1], tmp_path / "m.onnx")
    with torch.no_grad():
        want = model(x).numpy()
    got = onnx_runner(tmp_path / "m.onnx")(x.numpy())
    diff = np.abs(got - want).max(1)
    assert np.median(diff) < 1e-4 and (got.argmax(1) == want.argmax(1)).mean() >= 0.96, diff


@pytest.mark.e2e
def test_int8_calibration_keeps_merged_tokens_as_exact_as_an_unmerged_model() -> None:
    """The int8 graph (PT2E, simulated in PyTorch) of a merging ViT errs no more than the
    unmerged one's: quantising the size-weighted merge gave it one scale for tokens of mass 1 and
    of mass up to 26 and the logits off by their own magnitude (max error / max logit 1.0, top-1
    agreement 3-13 %, where r = 0 has 0.03 and 100 %)."""
    pytest.importorskip("litert_torch")
    from edgekd.export import calibrate_int8

    images = real_images(96)
    calib, test = images[:64], images[64:]
    errors = {}
    for r in (0, 8):  # 50 tokens over 4 blocks at r = 8: 18 tokens left, masses up to 26
        model = apply_tome(small_vit(), r)
        with torch.no_grad():
            reference = model(test)
        quantised, _ = calibrate_int8(model, test[:1], calib)
        with torch.no_grad():
            got = torch.cat([quantised(test[i : i + 1]) for i in range(len(test))])
        errors[r] = ((got - reference).abs().max() / reference.abs().max()).item()
        assert (got.argmax(1) == reference.argmax(1)).float().mean() >= 0.9, r
    assert errors[8] <= 2 * errors[0] + 0.02, errors


def test_vit_refuses_feature_map_methods(tmp_path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", student={"arch": "vit", "embed_dim": 32, "depth": 2},
                          distill={"method": "atkd"})
    msg = one_line_error(CliRunner().invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "run")]))
    assert "matches feature maps" in msg and "vit" in msg


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> object:
    """A ViT student trained WITH merging (tome_r 2) on real images, distilled from a small CNN."""
    d = tmp_path_factory.mktemp("vit")
    # 300 test images: more than the 256 a non-merging file's parity is measured on
    recipe = write_recipe(d / "r.yaml", data={"image_size": 16, "test_subset": 300}, teacher={"arch": "cnn", "width": 8},
                          student={"arch": "vit", "embed_dim": 32, "depth": 3, "num_heads": 2, "tome_r": 2},
                          distill={"method": "kd"}, train={"optimizer": "adamw", "lr": 0.002})
    r = CliRunner().invoke(app, ["distill", str(recipe), "--out", str(d / "run")])
    assert r.exit_code == 0, r.output + r.stderr
    return d / "run"


@pytest.mark.e2e
def test_tome_sweep_exports_and_benches_from_the_cli(vit_run) -> None:
    runner = CliRunner()
    # 16 px / 4 = 16 patches + class token: the first block can merge at most 8
    msg = one_line_error(runner.invoke(app, ["export", str(vit_run), "--tome-r", "9"]))
    assert "ToMe r=9 is too large" in msg and "r <= 8" in msg
    r = runner.invoke(app, ["export", str(vit_run), "--int8", "--tome-sweep", "0,2,4", "--tome-matcher",
                            "exact,lsh", "--calib", "64", "--samples", "100"])
    assert r.exit_code == 0, r.output + r.stderr
    report = json.loads((vit_run / "export" / "export.json").read_text())
    arts = report["artifacts"]
    assert report["converters"]["tflite"].startswith("litert-torch")  # auto picks it for a ViT
    # trained with r=2 exact: those are the student's own files; r=0 unpatched; r=4 both matchers; r=2 lsh
    for stem in ("student", "student-tome-r0-none", "student-tome-r2-lsh", "student-tome-r4-exact",
                 "student-tome-r4-lsh"):
        for suffix in (".onnx", "_fp32.tflite", "_int8.tflite"):
            assert stem + suffix in arts, sorted(arts)
    assert arts["student-tome-r4-lsh_int8.tflite"]["tome"] == {"r": 4, "schedule": [4, 4, 4], "matcher": "lsh", "bits": 16}
    assert arts["student-tome-r4-exact_fp32.tflite"]["parity"]["top1_agreement"] >= 95
    # a merging file's >= 99 % top-1 agreement is measured on every test image it is scored on, not
    # 256: the ToMe schedules and the student's own files (it was trained merging r = 2)
    for name in ("student-tome-r4-lsh.onnx", "student.onnx"):
        assert arts[name]["parity"]["images"] == arts[name]["test_images"] > 256, name
    # int8 ToMe must stay a classifier (the first int8 attempt predicted one class for every image)
    assert arts["student-tome-r4-exact_int8.tflite"]["test_top1"] > arts["student_int8.tflite"]["test_top1"] - 15
    sidecar = json.loads((vit_run / "export" / "student.model.json").read_text())
    assert sidecar["tome"] == {"r": 2, "matcher": "exact"}

    r = runner.invoke(app, ["bench", str(vit_run / "export"), "--device", "local", "--tome-sweep", "0,2,4",
                            "--runs", "5", "--warmup", "1", "--samples", "50"])
    assert r.exit_code == 0, r.output + r.stderr
    bench = json.loads((vit_run / "export" / "bench.json").read_text())
    rows = bench["tome"]["local"]
    assert {(row["r"], row["matcher"], row["format"]) for row in rows} == {
        (r_, m, f) for f in ("fp32", "int8") for r_, m in ((0, "none"), (2, "exact"), (2, "lsh"), (4, "exact"),
                                                        (4, "lsh"))}
    assert (vit_run / "export" / "bench_tome.png").stat().st_size > 0
    msg = one_line_error(runner.invoke(app, ["bench", str(vit_run / "export"), "--tome-sweep", "0,8"]))
    assert "no ToMe r=8 files" in msg and "--tome-sweep 0,8" in msg
    # auto on the target: the choice is by this target's p50 and the validation top-1 export measured
    r = runner.invoke(app, ["bench", str(vit_run / "export"), "--device", "local", "--tome-sweep", "auto",
                            "--runs", "20", "--warmup", "2", "--samples", "50"])
    assert r.exit_code == 0, r.output + r.stderr
    bench = json.loads((vit_run / "export" / "bench.json").read_text())
    choice, timed = bench["tome_auto"]["local"], bench["hosts"]["local"]["models"]
    assert {c["schedule"][0] for c in choice["candidates"]} == {4} and choice["baseline"]["schedule"] == [0, 0, 0]
    assert choice["baseline"]["latency_ms"] == timed["student-tome-r0-none_int8.tflite"]["latency_ms"]["p50"]
    assert choice["baseline"]["val_top1"] == arts["student-tome-r0-none_int8.tflite"]["val_top1"]
    chosen = timed[choice["file"]]["latency_ms"]["p50"]
    assert chosen <= choice["baseline"]["latency_ms"]  # never slower than r = 0 on the target
    assert f"ToMe auto on local: {choice['file']}" in r.output
    # bucketed matching sorts tokens: ONNX only, refused in one line for TFLite
    msg = one_line_error(runner.invoke(app, ["export", str(vit_run), "--tome-sweep", "4", "--tome-matcher", "bucketed"]))
    assert "bucketed ToMe matcher exports to ONNX only" in msg and "--formats onnx --no-int8" in msg
    r = runner.invoke(app, ["export", str(vit_run), "--formats", "onnx", "--no-int8", "--tome-sweep", "4",
                            "--tome-matcher", "bucketed", "--tome-bits", "2", "--samples", "100"])
    assert r.exit_code == 0, r.output + r.stderr
    art = json.loads((vit_run / "export" / "export.json").read_text())["artifacts"]["student-tome-r4-bucketed.onnx"]
    assert art["tome"] == {"r": 4, "schedule": [4, 4, 4], "matcher": "bucketed", "bits": 2, "bucket_size": 32}
    assert art["parity"]["top1_agreement"] >= 95


@pytest.mark.e2e
def test_a_tome_file_that_fails_parity_is_refused_without_losing_the_other_files(vit_run, tmp_path,
                                                                                  monkeypatch) -> None:
    """A refused ToMe schedule (here: the parity check made to fail for ToMe schedules only) is one
    line naming the fix; the student's own files and export.json are written, and a file an earlier
    export left under the refused name is gone (the export dir is what gets deployed)."""
    import shutil

    import edgekd.export.stage
    from edgekd.errors import EdgekdError

    def fails_for_schedules(name, parity, tome=False):
        if name.startswith("student-tome-"):
            raise EdgekdError("stand-in for a failed parity check")
        check(name, parity, tome)

    run = tmp_path / "run"
    shutil.copytree(vit_run, run, ignore=shutil.ignore_patterns("export"))
    (run / "export").mkdir()
    (run / "export" / "student-tome-r4-lsh.onnx").write_bytes(b"an earlier export's file")
    check = edgekd.export.stage.check_onnx_parity
    monkeypatch.setattr(edgekd.export.stage, "check_onnx_parity", fails_for_schedules)
    r = CliRunner().invoke(app, ["export", str(run), "--formats", "onnx", "--no-int8", "--tome-sweep", "4",
                                 "--tome-matcher", "lsh", "--samples", "50"])
    msg = one_line_error(r, code=1)
    assert "student-tome-r4-lsh.onnx merges other tokens than PyTorch" in msg and "use the exact matcher" in msg
    assert "every other file and export.json are written" in msg
    assert "student.onnx" in r.output  # the table of what was written comes first
    report = json.loads((run / "export" / "export.json").read_text())
    assert "student.onnx" in report["artifacts"] and "student-tome-r4-lsh.onnx" not in report["artifacts"]
    assert "% of 300, median |dlogit|" in report["refused"]["student-tome-r4-lsh"]
    assert ">= 99 %" in report["refused"]["student-tome-r4-lsh"]
    assert not (run / "export" / "student-tome-r4-lsh.onnx").exists()
    assert not (run / "export" / "student-tome-r4-lsh.model.json").exists()
    # the bench says why there is nothing to bench at that r
    msg = one_line_error(CliRunner().invoke(app, ["bench", str(run / "export"), "--tome-sweep", "4"]))
    assert "has no ToMe r=4 files: export refused them: student-tome-r4-lsh.onnx merges other tokens" in msg


def test_auto_r_picks_the_fastest_schedule_within_the_drop_and_never_a_slower_one() -> None:
    """The choice with a fake timer: it can only pick what the timer says is faster than r = 0."""
    from edgekd.tome.auto import candidate_schedules, choose_schedule

    schedules = candidate_schedules(50, 4)
    assert schedules == [[1] * 4, [2] * 4, [4] * 4, [8] * 4, [16, 16, 8, 4]]  # r = 1, 2, 4, 8, 16 (clamped)
    val = {0: 80.0, 1: 80.0, 2: 79.8, 4: 79.6, 8: 79.0, 16: 70.0}  # by the first block's r

    def timer(ms_by_r):
        return lambda every: [ms_by_r[s[0]] for s in every]

    # merging pays: r = 8 is fastest but loses 1 pt; r = 4 is within 0.5 pt and faster than r = 0
    pays = {0: 1.0, 1: 0.98, 2: 0.9, 4: 0.8, 8: 0.6, 16: 0.5}
    c = choose_schedule(schedules, 4, timer(pays), lambda s: val[s[0]], max_drop=0.5)
    assert c.schedule == [4] * 4 and c.merges and "0.800 ms vs 1.000 ms" in c.reason
    # merging costs (the 50-token student measured so): r = 0 stays, and says why
    costs = {0: 1.0, 1: 1.1, 2: 1.2, 4: 1.3, 8: 1.5, 16: 1.8}
    c = choose_schedule(schedules, 4, timer(costs), lambda s: val[s[0]], max_drop=0.5)
    assert c.schedule == [0] * 4 and not c.merges and "faster than r = 0" in c.reason
    # a tie is not faster: never a schedule as slow as r = 0
    tie = {r: 1.0 for r in pays}
    assert not choose_schedule(schedules, 4, timer(tie), lambda s: val[s[0]]).merges
    # over any random timer, the choice is never slower than r = 0 and never past the drop
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ms = {r: float(v) for r, v in zip(pays, torch.rand(len(pays), generator=g))}
        c = choose_schedule(schedules, 4, timer(ms), lambda s: val[s[0]], max_drop=0.5)
        assert ms[c.schedule[0]] <= ms[0] and val[0] - val[c.schedule[0]] <= 0.5


@pytest.mark.e2e
def test_auto_r_exports_the_chosen_schedule_timed_on_the_host(vit_run, tmp_path) -> None:
    """End to end with a fake timer that makes r = 2 the fastest: int8 candidates are converted,
    scored on validation in LiteRT, and the winner is exported; export.json records every candidate."""
    import shutil

    from edgekd.export import export

    run = tmp_path / "run"
    shutil.copytree(vit_run, run, ignore=shutil.ignore_patterns("export"))

    def fake(paths):  # r = 2 fastest (the file names hold the schedule)
        return [0.5 if "/r2-" in str(p) else 1.0 for p in paths]

    report = export(run, formats=("onnx",), int8=True, calib=32, samples=50, tome_auto=True, tome_max_drop=100.0,
                    tome_timer=fake).report
    auto = report["tome_auto"]
    assert auto["schedule"] == [2, 2, 2] and auto["baseline"]["latency_ms"] == 1.0 and auto["threads"] == 1
    assert [c["schedule"] for c in auto["candidates"]] == [[1, 1, 1], [2, 2, 2], [4, 4, 4], [8, 4, 2]]
    assert all(0 <= c["val_top1"] <= 100 for c in auto["candidates"])
    assert report["artifacts"]["student-tome-auto-exact.onnx"]["tome"]["schedule"] == [2, 2, 2]
    # timed with the deployment's threads, which this host must have: else the board chooses
    msg = one_line_error(CliRunner().invoke(app, ["export", str(run), "--tome-r", "auto", "--tome-threads", "999"]))
    assert "--tome-threads 999: this host can time 1 to" in msg and "--tome-sweep auto" in msg
