"""TeacherOutputCache: exact logits, teacher calls counted, memory and disk, with DistillationTrainer."""

from __future__ import annotations

import warnings

import monai.transforms
import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.engines.utils import IterationEvents
from monai.transforms import Compose, Lambdad, RandFlipd, RandLambdad, RandomizableTrait, ScaleIntensityd
from torch.utils.data import DataLoader

from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache, has_random_transforms
from monai_groupdistil.handlers import GroupDROHandler
from monai_groupdistil.losses import GroupDistillationLoss

G = 2


def make_data(n: int = 24) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return [{"image": x[i], "label": y[i], "group": i % G, "id": f"case{i:03d}"} for i in range(n)]


class CountingTeacher(torch.nn.Module):
    """A real small CNN that counts its forward calls and the samples it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 2),
        )
        self.calls = 0
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.samples += x.shape[0]
        return self.net(x)


def make_student() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))


def train(epochs: int, cache: TeacherOutputCache | None, shuffle: bool = False):
    teacher, student = CountingTeacher(), make_student()
    loss = GroupDistillationLoss(G, temperature=2.0, step_size=0.2)
    dro = GroupDROHandler(loss)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(make_data(), batch_size=8, shuffle=shuffle, generator=gen)
    trainer = DistillationTrainer(
        "cpu", epochs, loader, student, torch.optim.SGD(student.parameters(), 0.1), loss,
        teacher=teacher, teacher_cache=cache, train_handlers=[dro],
    )  # fmt: skip
    calls_per_epoch = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: calls_per_epoch.append(teacher.calls))
    used = []  # (epoch, sample id, teacher logits given to the loss)

    def record(engine):
        for sid, logits in zip(engine.state.batch["id"], engine.state.output["teacher_pred"]):
            used.append((engine.state.epoch, sid, logits.clone()))

    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, record)
    trainer.run()
    return teacher, student, dro, calls_per_epoch, used


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_training_calls_the_teacher_only_in_the_first_epoch_and_matches_online(tmp_path, on_disk):
    cache = TeacherOutputCache(tmp_path / "cache" if on_disk else None, id_key="id")
    teacher, student, dro, calls, _ = train(3, cache)
    assert calls == [3, 3, 3]  # 3 batches in epoch 1, none afterwards
    assert teacher.samples == 24 and cache.misses == 24 and cache.hits == 48 and len(cache) == 24
    if on_disk:
        assert len(list((tmp_path / "cache").glob("*.pt"))) == 24
    # identical training to the online teacher (same logits, same order)
    _, online_student, online_dro, online_calls, _ = train(3, None)
    assert online_calls == [3, 6, 9]
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), online_student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(dro.weight_history, online_dro.weight_history))


def test_cache_returns_the_exact_teacher_logits_with_shuffling(tmp_path):
    cache = TeacherOutputCache(tmp_path, id_key="id", keep_in_memory=True)
    teacher, _, _, calls, used = train(3, cache, shuffle=True)
    assert calls == [3, 3, 3]
    first_epoch = {sid: logits for epoch, sid, logits in used if epoch == 1}
    assert len(first_epoch) == 24 and len(used) == 72
    for _, sid, logits in used:  # later epochs get exactly what the teacher computed in epoch 1
        assert torch.equal(logits, first_epoch[sid]) and torch.equal(cache.get(sid), logits)
    teacher.eval()
    with torch.no_grad():  # and that is the teacher's output (up to the batch-size rounding of a 1-sample call)
        for d in make_data():
            torch.testing.assert_close(cache.get(d["id"]), teacher(d["image"][None])[0])
    # a new cache object on the same folder reads the stored values: no teacher call at all
    fresh = TeacherOutputCache(tmp_path, id_key="id")
    _, _, _, calls2, _ = train(1, fresh)
    assert calls2 == [0] and fresh.hits == 24 and fresh.misses == 0


def test_partial_hits_run_the_teacher_on_the_missing_samples_only():
    teacher = CountingTeacher().eval()
    cache = TeacherOutputCache(id_key="index")
    x = torch.randn(5, 1, 6, 6)
    forward = lambda inp: teacher(inp).detach()  # noqa: E731
    first = cache.lookup({"index": torch.tensor([0, 1, 2])}, x[:3], forward)
    out = cache.lookup({"index": torch.tensor([2, 3, 0, 4, 1])}, x[[2, 3, 0, 4, 1]], forward)
    assert teacher.calls == 2 and teacher.samples == 5  # 3, then only samples 3 and 4
    assert torch.equal(out[[0, 2, 4]], first[[2, 0, 1]])
    with torch.no_grad():
        torch.testing.assert_close(out, teacher(x[[2, 3, 0, 4, 1]]))


class _ExternalRandomTransform(RandomizableTrait):
    """A transform outside MONAI's Transform hierarchy that declares itself random (as RandTorchVisiond does)."""

    def __call__(self, data):
        return data


@pytest.mark.parametrize(
    "transform, random",
    [
        (Compose([Lambdad("image", lambda x: x * 2), ScaleIntensityd("image")]), False),
        (Compose([Lambdad("image", lambda x: x), Compose([RandFlipd("image", prob=0.5)])]), True),
        (Compose([RandLambdad("image", lambda x: x)]), True),  # RandomizableTrait, not Randomizable
        (Compose([_ExternalRandomTransform()]), True),
        (Compose([lambda d: d]), True),  # a plain callable cannot be inspected: random, as for CacheDataset
        (None, False),
    ],
)
def test_random_transform_detection_follows_cache_dataset(transform, random):
    assert has_random_transforms(transform) is random
    if transform is not None:  # the rule MONAI's CacheDataset applies to decide what it may cache
        first_random = transform.get_index_of_first(
            lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, monai.transforms.Transform)
        )
        assert (first_random is not None) is random


def test_errors_and_random_transform_detection(tmp_path):
    cache = TeacherOutputCache(id_key="subject")
    with pytest.raises(
        KeyError, match=r"no sample-id key 'subject'; keys present: \['group', 'id', 'image', 'label'\]"
    ):
        cache.ids_from_batch(make_data()[0])
    with pytest.raises(ValueError, match="3 sample ids for a batch of 2 inputs"):
        cache.lookup({"subject": ["a", "b", "c"]}, torch.zeros(2, 1), lambda x: x)

    random = Compose([Lambdad("image", lambda x: x), Compose([RandFlipd("image", prob=0.5)])])
    student = make_student()
    with pytest.warns(UserWarning, match="random transforms"):
        DistillationTrainer(
            "cpu", 1, DataLoader(Dataset(make_data(), transform=random), batch_size=8), student,
            torch.optim.SGD(student.parameters(), 0.1), GroupDistillationLoss(G), teacher=CountingTeacher(),
            teacher_cache=TeacherOutputCache(id_key="id"),
        )  # fmt: skip


def train_augmented(epochs: int, **kwargs):
    """Cached distillation on a dataset whose transform holds a random flip; counts the teacher calls."""
    teacher, student, cache = CountingTeacher(), make_student(), TeacherOutputCache(id_key="id")
    flip = Compose([RandFlipd("image", prob=0.5, spatial_axis=1)])
    flip.set_random_state(seed=0)
    loader = DataLoader(Dataset(make_data(), transform=flip), batch_size=8)
    trainer = DistillationTrainer(
        "cpu", epochs, loader, student, torch.optim.SGD(student.parameters(), 0.1),
        GroupDistillationLoss(G, temperature=2.0, step_size=0.2), teacher=teacher, teacher_cache=cache, **kwargs,
    )  # fmt: skip
    calls_per_epoch, online_checks = [], []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: calls_per_epoch.append(teacher.calls))

    def check(engine):  # the logits given to the loss are the teacher's output on the view the student sees
        out = engine.state.output
        with torch.no_grad():
            online_checks.append(torch.allclose(out["teacher_pred"], teacher.net(out["image"]), atol=1e-6))

    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, check)
    return trainer, teacher, cache, calls_per_epoch, online_checks


def test_random_augmentation_runs_the_teacher_online_and_ignores_the_cache():
    expected = "random transforms, so the teacher_cache is ignored and the teacher runs online"
    with pytest.warns(UserWarning, match=expected):
        trainer, teacher, cache, calls, online = train_augmented(3)
    assert trainer.teacher_cache is None and trainer.cache_with_random_transforms is False
    trainer.run()
    assert calls == [3, 6, 9] and teacher.samples == 72  # every batch of every epoch
    assert len(online) == 9 and all(online)
    assert cache.hits == cache.misses == 0 and len(cache) == 0  # the given cache was never touched


def test_random_augmentation_with_explicit_opt_in_uses_the_cache():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, teacher, cache, calls, online = train_augmented(3, cache_with_random_transforms=True)
    assert not [w for w in caught if "random transforms" in str(w.message)]
    assert trainer.teacher_cache is cache
    trainer.run()
    assert calls == [3, 3, 3] and teacher.samples == 24  # the first epoch only
    assert cache.misses == 24 and cache.hits == 48 and len(cache) == 24
    assert all(online[:3]) and not all(online[3:])  # later epochs reuse the first epoch's views (the documented cost)


@pytest.mark.parametrize("on_disk", [False, True])
def test_wrong_teacher_shape_leaves_the_cache_empty(tmp_path, on_disk):
    cache_dir = tmp_path / "cache" if on_disk else None
    cache = TeacherOutputCache(cache_dir, id_key="id", keep_in_memory=True)
    torch.manual_seed(0)
    wrong_teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))  # 3 classes, the student has 2
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(make_data(), batch_size=8), student, torch.optim.SGD(student.parameters(), 0.1),
        GroupDistillationLoss(G), teacher=wrong_teacher, teacher_cache=cache,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"teacher output has shape \(8, 3\) but the student output has shape \(8, 2\).*Nothing was"
    ):
        trainer.run()
    assert len(cache) == 0
    for sample in make_data()[:8]:
        assert sample["id"] not in cache and cache.get(sample["id"]) is None
    if on_disk:
        assert list(cache_dir.iterdir()) == []  # no .pt file and no leftover temporary file


@pytest.mark.parametrize("on_disk", [False, True])
def test_wrong_teacher_shape_on_partial_hits_stores_nothing_new(tmp_path, on_disk):
    cache = TeacherOutputCache(tmp_path if on_disk else None, id_key="index")
    x = torch.randn(5, 1, 6, 6)
    teacher = CountingTeacher().eval()
    good = cache.lookup({"index": torch.tensor([0, 1, 2])}, x[:3], lambda inp: teacher(inp).detach(), (3, 2))
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    order = torch.tensor([2, 3, 0, 4, 1])
    with pytest.raises(
        ValueError, match=r"output for the 2 samples missing from the cache has shape \(2, 3\), expected \(2, 2\)"
    ):
        cache.lookup({"index": order}, x[order], lambda inp: wrong(inp).detach(), expected_shape=(5, 2))
    assert len(cache) == 3 and 3 not in cache and 4 not in cache
    assert all(torch.equal(cache.get(str(i)), good[i]) for i in range(3))  # the stored values are untouched
    if on_disk:
        assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("on_disk", [False, True])
def test_fill_stores_one_fixed_pass_and_training_then_never_runs_the_teacher(tmp_path, on_disk):
    data = make_data()
    teacher = CountingTeacher()
    cache = TeacherOutputCache(tmp_path / "cache" if on_disk else None, id_key="id")
    assert cache.fill(teacher, DataLoader(data, batch_size=10, shuffle=False)) == 24
    assert teacher.calls == 3 and len(cache) == 24 and not teacher.training
    teacher.eval()
    with torch.no_grad():  # an independent pass over the same batches: 0-9, 10-19, 20-23
        for start in (0, 10, 20):
            expected = teacher(torch.stack([d["image"] for d in data[start : start + 10]]))
            for d, logits in zip(data[start : start + 10], expected):
                assert torch.equal(cache.get(d["id"]), logits)
    assert cache.fill(teacher, DataLoader(data, batch_size=10)) == 0  # nothing recomputed
    assert teacher.calls == 6  # the 3 calls of the independent pass above, then none
    before = {d["id"]: cache.get(d["id"]) for d in data}
    student = make_student()
    loss = GroupDistillationLoss(G, temperature=2.0, step_size=0.2)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = DistillationTrainer(
        "cpu", 2, loader, student, torch.optim.SGD(student.parameters(), 0.1), loss,
        teacher=teacher, teacher_cache=cache, train_handlers=[GroupDROHandler(loss)],
    )  # fmt: skip
    used = []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED,
        lambda e: used.extend(zip(e.state.batch["id"], e.state.output["teacher_pred"].clone())),
    )
    trainer.run()
    assert teacher.calls == 6 and cache.misses == 24  # training never ran the teacher
    assert len(used) == 48 and all(torch.equal(logits, before[sid]) for sid, logits in used)


def test_fill_runs_the_teacher_through_the_inferer_on_its_device():
    seen = []

    def inferer(inputs, network):
        seen.append((inputs.shape[0], inputs.device))
        return 2 * network(inputs)

    teacher = CountingTeacher()
    cache = TeacherOutputCache(id_key="id")
    batches = [{"image": torch.randn(3, 1, 6, 6), "id": torch.tensor([5, 6, 7])}]
    assert cache.fill(teacher, batches, inferer=inferer) == 3
    assert seen == [(3, torch.device("cpu"))]
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(cache.get("6"), 2 * teacher(batches[0]["image"])[1], rtol=0, atol=1e-6)
    identity = TeacherOutputCache(id_key="id")  # a teacher without parameters runs on the CPU
    assert identity.fill(torch.nn.Flatten(), batches) == 3 and torch.equal(
        identity.get("7"), batches[0]["image"][2, 0].flatten()
    )


def test_fill_refuses_a_batch_without_the_input_or_id_key_and_keeps_the_earlier_batches():
    teacher = CountingTeacher()
    cache = TeacherOutputCache(id_key="id")
    good = {"image": torch.randn(2, 1, 6, 6), "id": ["a", "b"]}
    with pytest.raises(
        KeyError, match=r"no 'img' key; keys present: \['id', 'image'\]\. .*pass the batch's input key as image_key"
    ):
        cache.fill(teacher, [good], image_key="img")
    assert len(cache) == 0 and teacher.calls == 0
    with pytest.raises(KeyError, match=r"no 'id' key; keys present: \['image'\]\. .*build the cache with id_key set"):
        cache.fill(teacher, [good, {"image": torch.randn(2, 1, 6, 6)}])
    assert len(cache) == 2 and "a" in cache and "b" in cache  # the first batch's values are complete and kept
    with pytest.raises(ValueError, match="3 sample ids for a batch of 2 inputs"):
        cache.fill(teacher, [{"image": torch.randn(2, 1, 6, 6), "id": ["c", "d", "e"]}])
    assert len(cache) == 2 and teacher.calls == 1
    with pytest.raises(TypeError, match=r"a dictionary batch with keys \['image', 'id'\] is expected, got list"):
        cache.fill(teacher, [[torch.randn(2, 1, 6, 6), ["f", "g"]]])
    assert len(cache) == 2 and teacher.calls == 1


@pytest.mark.parametrize("on_disk", [False, True])
def test_stored_outputs_of_another_teacher_are_refused_when_read(tmp_path, on_disk):
    """A cache filled by a teacher of 3 classes (or a cache_dir left by another run) is refused by a student of 2
    classes at the first batch, with both shapes named, and is left as it was."""
    data = make_data(8)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    cache = TeacherOutputCache(tmp_path if on_disk else None, id_key="id")
    cache.fill(other, DataLoader(data, batch_size=4))
    reread = TeacherOutputCache(tmp_path, id_key="id") if on_disk else cache  # a later run on the same folder
    teacher = CountingTeacher()
    batch = {"image": torch.stack([d["image"] for d in data[:4]]), "id": [d["id"] for d in data[:4]]}
    with pytest.raises(
        ValueError,
        match=r"stored teacher outputs of \['case000', 'case001', 'case002'\] \.\.\. have shape \(3,\) per sample, but "
        r"the student output has shape \(2,\) per sample; .*use a fresh cache_dir",
    ):
        reread.lookup(batch, batch["image"], teacher, expected_shape=(4, 2))
    assert teacher.calls == 0 and len(reread) == 8 and reread.get("case001").shape == (3,)


def test_fill_warns_when_the_loaders_dataset_has_random_transforms():
    data = make_data(4)
    loader = DataLoader(Dataset(data, RandFlipd(keys="image", prob=0.5, spatial_axis=0)), batch_size=2)
    with pytest.warns(UserWarning, match="fill: the loader's dataset transform holds random transforms"):
        TeacherOutputCache(id_key="id").fill(CountingTeacher(), loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TeacherOutputCache(id_key="id").fill(CountingTeacher(), DataLoader(Dataset(data, ScaleIntensityd("image"))))


def test_fill_stores_plain_tensors_from_metatensor_inputs():
    from monai.data import MetaTensor

    images = MetaTensor(torch.randn(3, 1, 6, 6), meta={"filename_or_obj": "x.nii.gz"})
    cache = TeacherOutputCache(id_key="id")
    teacher = CountingTeacher()
    cache.fill(teacher, [{"image": images, "id": ["a", "b", "c"]}])
    assert type(cache.get("b")) is torch.Tensor
    with torch.no_grad():
        assert torch.equal(cache.get("b"), teacher.eval()(images.as_tensor())[1])


def test_a_damaged_cache_file_is_removed_with_a_warning_and_computed_anew(tmp_path):
    cache = TeacherOutputCache(tmp_path / "cache", id_key="id", keep_in_memory=False)
    cache.put("case000", torch.ones(2))
    (damaged,) = (tmp_path / "cache").glob("*.pt")
    cache.put("case001", torch.zeros(2))
    damaged.write_bytes(damaged.read_bytes()[:20])  # truncated, as by a full disk before writes were atomic
    with pytest.warns(UserWarning, match=rf"teacher cache: '{damaged}' cannot be read .*computed anew"):
        assert cache.get("case000") is None
    assert not damaged.exists() and "case000" not in cache and len(cache) == 1
    assert torch.equal(cache.get("case001"), torch.zeros(2))
    cache.put("case000", torch.full((2,), 3.0))
    assert torch.equal(cache.get("case000"), torch.full((2,), 3.0))
