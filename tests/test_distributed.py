"""Every way of running a training step gives the loss and gradients of one plain process with the
whole batch: two gloo processes with half the batch each, gradient accumulation, torch.compile.
Evaluation in two processes gives the metrics of one process."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from parse_config import flatten_config, resolve
from tests.conftest import make_trainer, toy_config, untrained_teachers
from trainer.build import build_loaders, build_teachers, load_corpora
from model.model import model_from_config
from trainer.evaluate import evaluate
from common.checkpoint import CheckpointError
from common.distributed import DistInfo, on_main


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(config, info):
    """Loss and gradients of the first training batch (eval mode: no dropout, so runs are comparable)."""
    trainer, batch = make_trainer(config, info)
    trainer.model.eval()
    loss, _ = trainer.training_step(batch)
    return {"loss": loss.item(), "grads": grads(trainer.model)}


def evaluation(config, info):
    """Metrics of an untrained model on the evaluation set, and whether this process ranked it."""
    torch.manual_seed(0)
    corpora = load_corpora(config)
    model, tokenizer = model_from_config(config)
    _, loader = build_loaders(config, corpora, tokenizer, rank=info.rank, world_size=info.world_size)
    summary, scores = evaluate(model, loader, corpora["eval"].languages, config["eval"], torch.device("cpu"),
                               return_scores=True)
    sims = {lang: (sc.query_ids, sc.video_ids, sc.sims) for lang, sc in scores.items()} if scores else None
    return {"summary": summary, "sims": sims}


def failure_on_rank_0(config, info):
    """What every rank sees when work done on rank 0 alone fails."""
    def fail():
        raise CheckpointError("disk full")
    try:
        on_main(fail)
    except CheckpointError as e:
        return {"raised": str(e)}
    return {"raised": None}


def teacher_cache(config, info):
    """The cached outputs of the first teacher, built (or read) by this process."""
    corpora = load_corpora(config)
    _, tokenizer = model_from_config(config)
    teachers = build_teachers(config, corpora["train"], torch.device("cpu"), tokenizer)
    return teachers.cache[0]


def cache_unreadable_on_rank_1(config, info):
    """Rank 1 on a 'node' that cannot read the file rank 0 wrote."""
    import trainer.teachers
    if info.rank == 1:
        trainer.teachers._load_cache = lambda path: None
    try:
        teacher_cache(config, info)
    except CheckpointError as e:
        return {"raised": str(e)}
    return {"raised": None}


TASKS = {"step": one_step, "eval": evaluation, "fail": failure_on_rank_0, "cache": teacher_cache,
         "unreadable": cache_unreadable_on_rank_1}


def _worker(rank, world_size, init_file, flat_config, out, task="step"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(TASKS[task](resolve(flat_config), DistInfo(rank, world_size)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def assert_same(single, parts, tolerance=1e-5):
    for result in parts:
        assert result["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert set(result["grads"]) == set(single["grads"])
        for name, grad in single["grads"].items():
            # Within 1e-5 of the tensor's scale: splitting a batch changes matmul shapes and so the
            # float32 rounding, which an element-wise tolerance flags on elements near zero.
            diff = (result["grads"][name] - grad).abs().max().item()
            assert diff <= tolerance * max(1.0, grad.abs().max().item()), (name, diff, grad.abs().max().item())


@pytest.mark.parametrize("stage", ["translate-train", "c2kd"])
def test_two_processes_match_one_process_with_the_whole_batch(toy_assets, tmp_path, stage):
    teachers = untrained_teachers(toy_assets, tmp_path) if stage == "c2kd" else ()
    config = toy_config(toy_assets, tmp_path, stage, teachers)
    single = one_step(config, DistInfo())
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), flatten_config(config), str(out)), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert_same(single, parts)
    assert single["grads"]["text.proj.fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("stage", ["translate-train", "c2kd"])
def test_gradient_accumulation_gives_the_whole_batch_gradients(toy_assets, tmp_path, stage):
    teachers = untrained_teachers(toy_assets, tmp_path) if stage == "c2kd" else ()
    whole = one_step(toy_config(toy_assets, tmp_path, stage, teachers), DistInfo())
    accumulated = one_step(toy_config(toy_assets, tmp_path, stage, teachers,
                                       **{"trainer.accumulation_steps": 4}), DistInfo())
    assert_same(whole, [accumulated])


def test_compiled_step_gives_the_eager_loss_and_gradients(toy_assets, tmp_path):
    """``trainer.compile: true`` runs the step through torch.compile (the inductor backend, which
    generates C++ on the CPU); the algorithm is unchanged."""
    from torch._dynamo.utils import counters
    eager = one_step(toy_config(toy_assets, tmp_path, "translate-train"), DistInfo())
    torch._dynamo.reset()
    counters.clear()
    compiled = one_step(toy_config(toy_assets, tmp_path, "translate-train", **{"trainer.compile": True}), DistInfo())
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through the compiler
    # Inductor fuses the reductions of each length bucket its own way: rounding up to 2e-5 of a
    # tensor's scale (measured 1.1e-5), far below what a changed algorithm gives.
    assert_same(eager, [compiled], tolerance=2e-5)


def test_two_processes_evaluate_as_one_ranking_once(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"data.eval_batch_size": 7})
    single = evaluation(config, DistInfo())
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), flatten_config(config), str(out), "eval"), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert parts[1]["sims"] is None  # rank 0 alone ranks the gathered set
    assert parts[1]["summary"] == parts[0]["summary"]  # and every rank receives its metrics
    for lang, (query_ids, video_ids, matrix) in single["sims"].items():
        q_ids, v_ids, gathered = parts[0]["sims"][lang]
        rows = torch.tensor([q_ids.index(q) for q in query_ids])
        cols = torch.tensor([v_ids.index(v) for v in video_ids])
        torch.testing.assert_close(gathered[rows][:, cols], matrix, atol=1e-5, rtol=0)
    # Different matmul shapes change the embeddings by float32 rounding, which can flip a near tie.
    one_query = 100 / 48
    for lang, directions in single["summary"].items():
        for direction, stats in directions.items():
            for stat, value in stats.items():
                tolerance = 1.0 if stat in ("MedR", "MeanR") else one_query
                assert parts[0]["summary"][lang][direction][stat] == pytest.approx(value, abs=tolerance + 1e-9), \
                    (lang, direction, stat)


def test_a_failure_on_rank_0_is_raised_on_every_rank(toy_assets, tmp_path):
    """Checkpoint writing, the teacher cache and ranking run on rank 0 alone; if they fail, the other
    ranks raise the same error instead of waiting forever."""
    out = tmp_path / "result"
    config = flatten_config(toy_config(toy_assets, tmp_path))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), config, str(out), "fail"), nprocs=2, join=True)
    assert [torch.load(f"{out}.{r}")["raised"] for r in range(2)] == ["disk full", "disk full"]


def test_accumulation_replays_each_micro_batch_with_its_own_dropout_masks(toy_assets, tmp_path):
    """In train mode: the accumulated gradients equal those of forwarding the same micro-batches
    with a graph, in order from the same random state, under one loss over the whole batch."""
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"trainer.accumulation_steps": 4})
    trainer, batch = make_trainer(config, DistInfo())
    model = trainer.model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    step_loss, _ = trainer.training_step(batch)
    accumulated = {"loss": step_loss.item(), "grads": grads(model)}

    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outputs = [model(*trainer._inputs(part)) for part in batch.split(4)]
    video = torch.cat([v for v, _ in outputs])
    text = {lang: torch.cat([t[lang] for _, t in outputs]) for lang in batch.student}
    loss, _ = trainer.loss_fn(text, video, rows=trainer._rows(batch))
    loss.backward()
    assert_same({"loss": loss.item(), "grads": grads(model)}, [accumulated])


def test_two_processes_build_the_teacher_cache_of_one(toy_assets, tmp_path):
    """Each rank embeds half of the training set; rank 0 joins the halves and writes the file."""
    teachers = untrained_teachers(toy_assets, tmp_path)
    single = teacher_cache(toy_config(toy_assets, tmp_path, "c2kd", teachers,
                                      **{"teachers.cache_dir": str(tmp_path / "cache_one")}), DistInfo())
    config = toy_config(toy_assets, tmp_path, "c2kd", teachers, **{"teachers.cache_dir": str(tmp_path / "cache_two")})
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), flatten_config(config), str(out), "cache"), nprocs=2, join=True)
    assert len(list((tmp_path / "cache_two").glob("*.pt"))) == len(teachers)
    for r in range(2):
        shared = torch.load(f"{out}.{r}", weights_only=True)
        for key in ("offsets", "counts"):
            assert torch.equal(shared[key], single[key])
        for key in ("text", "video"):
            torch.testing.assert_close(shared[key], single[key], atol=1e-5, rtol=0)


def test_a_cache_one_rank_cannot_read_stops_every_rank(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "c2kd", untrained_teachers(toy_assets, tmp_path))
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), flatten_config(config), str(out), "unreadable"), nprocs=2,
             join=True)
    for r in range(2):
        raised = torch.load(f"{out}.{r}")["raised"]
        assert raised is not None and "could not be read back on rank(s) 1" in raised


def test_a_rank_beyond_a_small_evaluation_set_embeds_nothing(toy_assets, tmp_path):
    """With more processes than evaluation items, some ranks' slices are empty: they contribute
    nothing, and the ranks that have items give the whole set."""
    from trainer.evaluate import _concat, embed_eval_set
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"data.eval_batch_size": 1})
    corpora = load_corpora(config)
    model, tokenizer = model_from_config(config)
    languages = corpora["eval"].languages

    def part(rank, world_size):
        _, loader = build_loaders(config, {"eval": corpora["eval"]}, tokenizer, rank=rank, world_size=world_size)
        return embed_eval_set(model, loader, languages, torch.device("cpu"))

    pairs = sum(len(c) for c in corpora["eval"].captions["en"])
    assert part(pairs, pairs + 2) is None
    whole = _concat([part(0, 1)])
    joined = _concat([part(0, 2), None, part(1, 2)])
    order = torch.argsort(joined[2])  # the ranks take alternate items
    assert torch.equal(joined[2][order], whole[2])
    torch.testing.assert_close(joined[1][order], whole[1])
    torch.testing.assert_close(joined[0]["de"][order], whole[0]["de"])
