"""VideoIndex search methods: brute force in torch (the reference), exact and IVF in FAISS, and
their files."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from utils.inference import FaissExact, FaissIVF, InferenceError, TorchExact, VideoIndex

pytest.importorskip("faiss", reason="faiss-cpu is in requirements.txt; install it to test the FAISS methods")


def random_index(n=2000, dim=64, method=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    return VideoIndex([f"v{i:05d}" for i in range(n)], embeddings, method)


def queries(n=50, dim=64, seed=1):
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def positions(hits):
    return [[i for i, _ in row] for row in hits]


def recall(found, exact):
    return np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(positions(found), positions(exact))])


def test_faiss_exact_ranks_as_torch_brute_force():
    q = queries()
    torch_hits = random_index().search(q, 10)
    faiss_hits = random_index(method=FaissExact()).search(q, 10)
    assert positions(faiss_hits) == positions(torch_hits)
    assert np.allclose([s for row in faiss_hits for _, s in row], [s for row in torch_hits for _, s in row], atol=1e-6)
    # The torch path in small blocks of queries gives the same ranking as in one block.
    assert positions(random_index(method=TorchExact(block_scores=5000)).search(q, 10)) == positions(torch_hits)


def test_ivf_recall_grows_with_the_cells_it_scans():
    q = queries()
    exact = random_index().search(q, 10)
    ivf = random_index(method=FaissIVF(nlist=16, nprobe=1))
    one_cell = recall(ivf.search(q, 10), exact)
    ivf.method.nprobe = 4  # a query-time parameter: the built index is kept
    four_cells = recall(ivf.search(q, 10), exact)
    ivf.method.nprobe = 16
    every_cell = ivf.search(q, 10)
    # Random data: one cell of 16 holds few of a query's neighbours; all cells hold all of them.
    assert one_cell < four_cells < 1.0
    assert positions(every_cell) == positions(exact)


def test_faiss_index_saved_beside_the_safetensors_file_and_read_back(tmp_path):
    index = random_index(method=FaissIVF(nlist=16, nprobe=3))
    path = index.save(tmp_path / "videos.safetensors")
    assert len(list(tmp_path.glob("videos.*.faiss"))) == 1
    loaded = VideoIndex.load(path)
    assert loaded.method == FaissIVF(nlist=16, nprobe=3) and loaded.ids == index.ids
    assert torch.equal(loaded.embeddings, index.embeddings)
    q = queries()
    assert loaded.search(q, 10) == index.search(q, 10)
    # The same file searched by brute force instead: the reference ranking.
    reference = VideoIndex.load(path, method=TorchExact())
    assert positions(reference.search(q, 10)) == positions(random_index().search(q, 10))
    # A torch index writes no FAISS file and reads back as a torch index.
    random_index().save(tmp_path / "plain.safetensors")
    assert not list(tmp_path.glob("plain*.faiss"))
    assert isinstance(VideoIndex.load(tmp_path / "plain.safetensors").method, TorchExact)


def test_an_index_file_without_a_method_reads_as_torch_brute_force(tmp_path):
    """Index files written before the FAISS methods hold no method in their metadata."""
    index = random_index(n=30)
    save_file({"embeddings": index.embeddings}, str(tmp_path / "old.safetensors"),
              metadata={"format": "c2kd-video-index", "ids": json.dumps(index.ids)})
    loaded = VideoIndex.load(tmp_path / "old.safetensors")
    assert isinstance(loaded.method, TorchExact) and loaded.search(queries(3), 5) == index.search(queries(3), 5)


def test_bad_faiss_parameters_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(InferenceError, match="nlist = 64 cells for 50 videos"):
        random_index(n=50, method=FaissIVF(nlist=64, nprobe=8)).build()
    with pytest.raises(InferenceError, match="nprobe = 20: expected 1 to nlist = 16"):
        random_index(method=FaissIVF(nlist=16, nprobe=20)).build()
    with pytest.raises(InferenceError, match="top = 0: ask for at least 1 video"):
        random_index(n=50, method=FaissExact()).search(queries(2), 0)
    with pytest.raises(InferenceError, match=r"videos.faiss: an index is saved as a safetensors file"):
        random_index(n=50, method=FaissExact()).save(tmp_path / "videos.faiss")
    assert not (tmp_path / "videos.faiss").exists()
    index = random_index(n=30)
    save_file({"embeddings": index.embeddings}, str(tmp_path / "odd.safetensors"),
              metadata={"format": "c2kd-video-index", "ids": json.dumps(index.ids),
                        "method": json.dumps({"name": "FaissIVF", "params": {"nlist": 4, "nprobe": 2, "cells": 3}})})
    with pytest.raises(InferenceError, match="odd.safetensors: bad parameters of search method FaissIVF .*'cells'"):
        VideoIndex.load(tmp_path / "odd.safetensors")


def test_a_faiss_file_of_another_collection_of_the_same_size_is_refused(tmp_path):
    random_index(method=FaissExact(), seed=0).save(tmp_path / "a" / "videos.safetensors")
    random_index(method=FaissExact(), seed=1).save(tmp_path / "b" / "videos.safetensors")
    [a_file], [b_file] = (tmp_path / "a").glob("*.faiss"), (tmp_path / "b").glob("*.faiss")
    b_file.replace(a_file)  # same size, other vectors: only a check of the content can tell
    with pytest.raises(InferenceError, match=r"a/videos\.\w{8}\.faiss: not the FAISS index saved with these "):
        VideoIndex.load(tmp_path / "a" / "videos.safetensors")
    # Saving another collection at the same path replaces the FAISS file whole, old name removed.
    index = random_index(n=500, method=FaissExact(), seed=2)
    index.save(tmp_path / "a" / "videos.safetensors")
    assert [f.name for f in (tmp_path / "a").glob("*.faiss")] != [a_file.name]
    assert len(list((tmp_path / "a").glob("*.faiss*"))) == 1
    assert VideoIndex.load(tmp_path / "a" / "videos.safetensors").search(queries(5), 5) == index.search(queries(5), 5)


def test_a_failed_faiss_write_is_one_line_and_leaves_no_new_safetensors(tmp_path):
    index = random_index(n=200, method=FaissExact())
    index.save(tmp_path / "a" / "videos.safetensors")
    [name] = [f.name for f in (tmp_path / "a").glob("*.faiss")]
    (tmp_path / "b" / f"{name}.tmp").mkdir(parents=True)  # faiss cannot open its temporary file
    with pytest.raises(InferenceError, match=rf"{name}: cannot write the FAISS index \("):
        index.save(tmp_path / "b" / "videos.safetensors")
    assert not (tmp_path / "b" / "videos.safetensors").exists()
