"""Datasets: both layouts, the up-front index check, per-item determinism, sharding, occlusion."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ofer.data.datasets import (
    FaceDataset,
    StreamBatchSampler,
    check_index,
    load_index,
    read_image_list,
)
from ofer.nets.farl import CLIP_MEAN, CLIP_STD, FaRLEncoder
from ofer.errors import AssetError, UnsafePickleError

from _train_helpers import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    truth = write_world(root, "TOY_TRAIN", n_actors=5, n_images=3, layout="mica", seed=1)
    truth23 = write_world(root, "REFIT_VAL", n_actors=3, n_images=2, layout="ofer23", seed=2)
    return root, truth, truth23


def test_mica_layout_identity_items(world):
    root, truth, _ = world
    entries = load_index(root, ["toy_train"])  # names are upper-cased
    assert [e.actor for e in entries] == sorted(truth)
    assert entries[0].layout == "mica" and entries[0].images[0].parts[-4:-2] == ("TOY", "arcface_input")
    check_index(entries)
    ds = FaceDataset(entries, images_per_actor=2, load_farl=True)
    item = ds[(1, (0, 7))]
    assert item["arcface"].shape == (2, 3, 112, 112) and item["arcface"].dtype == torch.float32
    assert item["farl"].shape == (2, 3, 224, 224)
    assert item["shape_coeffs"].shape == (2, 300)
    np.testing.assert_array_equal(item["shape_coeffs"][1].numpy(), truth[entries[1].actor]["shape"])
    assert "occlusion_mask" not in item and "exp_coeffs" not in item


def test_farl_crop_is_the_image_and_the_encoder_normalises_it(world):
    root, _, _ = world
    entries = load_index(root, ["TOY_TRAIN"])
    item = FaceDataset(entries, images_per_actor=1, load_farl=True)[0]
    from PIL import Image

    rgb = np.asarray(Image.open(entries[0].images[0]).convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(item["farl"][0].numpy(), rgb.transpose(2, 0, 1), atol=1e-7)
    ref = (rgb - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    x = FaRLEncoder(image_size=224, width=64, layers=1, heads=1).prepare(item["farl"])
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    # a smaller encoder: resized, and the normalisation of a flat grey is kept
    small = FaRLEncoder(image_size=64, width=64, layers=1, heads=1).prepare(torch.full((1, 3, 224, 224), 0.5))
    assert small.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(small[0, :, 0, 0].numpy(),
                               (0.5 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-5)


def test_ofer23_layout_expression_items(world):
    root, _, truth23 = world
    entries = load_index(root, ["REFIT_VAL"])
    assert entries[0].layout == "ofer23" and "FLAME23_parameters" in str(entries[0].params)
    ds = FaceDataset(entries, images_per_actor=3, mode="expression", n_exp=50)
    item = ds[2]
    t = truth23[entries[2].actor]
    assert item["arcface"].shape == (3, 3, 112, 112)  # 2 images, cycled for K=3
    np.testing.assert_array_equal(item["exp_coeffs"][0].numpy(), t["exp"][:50])
    np.testing.assert_array_equal(item["jaw_pose"][2].numpy(), t["jaw"])


def test_mica_expression_slices(world):
    root, truth, _ = world
    entries = load_index(root, ["TOY_TRAIN"], layout="mica")
    item = FaceDataset(entries, images_per_actor=1, mode="expression", n_exp=50)[0]
    t = truth[entries[0].actor]
    np.testing.assert_array_equal(item["exp_coeffs"][0].numpy(), t["exp"][:50])  # betas[300:350]
    np.testing.assert_array_equal(item["jaw_pose"][0].numpy(), t["jaw"])  # pose[6:9]


def test_index_check_reports_all_missing_files(tmp_path):
    write_world(tmp_path, "TOY_TRAIN", n_actors=3, n_images=2, seed=3)
    entries = load_index(tmp_path, ["TOY_TRAIN"])
    gone = [entries[0].images[1], entries[2].images[0].with_suffix(".npy"), entries[1].params]
    for p in gone:
        p.unlink()
    report = tmp_path / "missing.txt"
    with pytest.raises(AssetError) as e:
        check_index(entries, report_path=report)
    msg = str(e.value)
    assert msg.startswith(f"3 of 15 dataset files missing, full list in {report}: ")
    assert "\n" not in msg
    assert sorted(report.read_text().split()) == sorted(str(p) for p in gone)


def test_missing_image_list_and_bad_key(tmp_path):
    with pytest.raises(AssetError, match=r"^no image list for dataset NOPE: tried .*NOPE.npy and "):
        load_index(tmp_path, ["NOPE"])
    write_world(tmp_path, "TOY_TRAIN", n_actors=1, n_images=1, seed=4)
    entries = load_index(tmp_path, ["TOY_TRAIN"])
    np.savez(entries[0].params, wrong=np.zeros(3))
    with pytest.raises(AssetError, match=r"have no key 'betas' \(keys: wrong\)$"):
        check_index(entries)


def test_image_list_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    arr = np.empty((), dtype=object)
    arr[()] = {"a": Evil()}
    path = tmp_path / "evil.npy"
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(UnsafePickleError, match=r"refused to load pickled object builtins\.print"):
        read_image_list(path)
    good = tmp_path / "good.npy"
    np.save(good, {"x": (["a.jpg"], "b.npz")}, allow_pickle=True)
    assert read_image_list(good) == {"x": (["a.jpg"], "b.npz")}


def test_items_are_pure_functions_of_their_key(world):
    root, _, _ = world
    entries = load_index(root, ["TOY_TRAIN"])
    ds = FaceDataset(entries, images_per_actor=2, occlusion_prob=1.0, occlusion_area=(0.1, 0.2))
    a, b, c = ds[(3, (0, 11))], ds[(3, (0, 11))], ds[(3, (0, 12))]
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["occlusion_mask"], c["occlusion_mask"])


def test_occlusion_mask_and_blob(world):
    from ofer.data.align import transform_points
    from ofer.data.datasets import detect_crop_frame
    from ofer.data.occlusion import ARCFACE_TEMPLATE, face_box

    root, _, _ = world
    entries = load_index(root, ["TOY_TRAIN"])
    clean = FaceDataset(entries, images_per_actor=2)[(0, (5, 5))]
    ds = FaceDataset(entries, images_per_actor=2, occlusion_prob=1.0, occlusion_area=(0.1, 0.3))
    occ = ds[(0, (5, 5))]
    m = occ["occlusion_mask"]
    assert m.shape == (2, 1, 224, 224) and set(m.unique().tolist()) == {0.0, 1.0}
    # the toy blobs are the crops strided by 2 (MICA's 2x alignment), RGB
    frame, bgr = ds._frames["TOY_TRAIN"]
    np.testing.assert_allclose(frame, [[2, 0, 0], [0, 2, 0]])
    assert not bgr
    # area: a fraction of the face box (ArcFace template mapped into the crop) within [0.1, 0.3]
    _, ref = face_box(transform_points(frame, ARCFACE_TEMPLATE))
    frac = m.sum(dim=(1, 2, 3)) / min(ref, 224 * 224)
    assert torch.all(frac >= 0.1 - 1e-6) and torch.all(frac <= 0.3 + 1e-6), frac
    # same occluder in the ArcFace input: untouched outside the resampled mask, changed inside
    m112 = m[:, :, ::2, ::2].expand(2, 3, 112, 112)
    assert torch.equal(occ["arcface"][m112 == 0], clean["arcface"][m112 == 0])
    assert not torch.allclose(occ["arcface"][m112 == 1], clean["arcface"][m112 == 1])


def test_detect_crop_frame_finds_the_farl_box_crop():
    """A FaRL box crop + BGR ArcFace blob made by ofer.data.align from one synthetic image."""
    from ofer.data.align import (
        ARCFACE_TEMPLATE,
        CANONICAL_BOX,
        arcface_blob,
        farl_crop_matrix,
        norm_crop,
        transform_points,
        warp_affine,
    )

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:300]
    img = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 13.0),
                    128 + 60 * np.sin((xx + yy) / 17.0)], -1)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    kps = ARCFACE_TEMPLATE * 2.0 + 40.0  # an upright face, scale 2
    from ofer.data.align import box_from_kps
    from ofer.data.datasets import detect_crop_frame

    crop = warp_affine(img, farl_crop_matrix(box_from_kps(kps)), 224)
    blob = arcface_blob(norm_crop(img, kps), "bgr")
    m, bgr = detect_crop_frame(crop.astype(np.float32).transpose(2, 0, 1) / 255.0, blob)
    assert bgr
    np.testing.assert_allclose(m, farl_crop_matrix(CANONICAL_BOX, 224))
    # the template keypoints land on the keypoints' place in the crop (within a pixel)
    expect = transform_points(farl_crop_matrix(box_from_kps(kps)), kps)
    np.testing.assert_allclose(transform_points(m, ARCFACE_TEMPLATE), expect, atol=1.0)


def test_stream_sampler_shards_and_resumes():
    full = StreamBatchSampler(10, batch_size=4, seed=3)
    r0 = StreamBatchSampler(10, batch_size=2, seed=3, rank=0, world_size=2)
    r1 = StreamBatchSampler(10, batch_size=2, seed=3, rank=1, world_size=2)
    for step in range(7):
        assert full.batch_at(step) == r0.batch_at(step) + r1.batch_at(step)
    # every item exactly once per epoch of the stream
    stream = [k[0] for s in range(5) for k in full.batch_at(s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    # resuming at step 4 yields the same batches as iterating from 0
    it = iter(StreamBatchSampler(10, batch_size=4, seed=3, start_step=4))
    assert [next(it) for _ in range(3)] == [full.batch_at(s) for s in (4, 5, 6)]
    # keys carry (seed, position) so items differ between positions of the same actor
    assert full.batch_at(0)[1][1] == (3, 1)


def test_dataloader_with_workers_matches_in_process(world):
    root, _, _ = world
    entries = load_index(root, ["TOY_TRAIN"])
    ds = FaceDataset(entries, images_per_actor=2, occlusion_prob=0.5)
    sampler = StreamBatchSampler(len(ds), batch_size=3, seed=9)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    for step, batch in enumerate(got):
        ref = torch.utils.data.default_collate([ds[k] for k in sampler.batch_at(step)])
        for k in ref:
            assert torch.equal(batch[k], ref[k])
    del it
