"""The README's "Your own data" walkthrough works as written: every ```yaml block of that section
is a complete spec that `vlmflow validate`'s loader accepts beside files laid out as the section
describes, each of its sources reads every row (captions or conversations, nothing quarantined),
and the training block plans."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as skdata

from vlmflow.cli import cli
from vlmflow.components.sources.base import SOURCES, RawRow, SourceContext
from vlmflow.specs import load_recipe
from vlmflow.specs.data import source_name

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Your own data"
PHOTOS = [skdata.astronaut, skdata.chelsea, skdata.coffee, skdata.rocket, skdata.camera]


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    assert f"\n{SECTION}\n" in text, f"README.md has no {SECTION!r} section"
    return text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]


BLOCKS = re.findall(r"^```yaml\n(.*?)^```$", walkthrough(), flags=re.MULTILINE | re.DOTALL)


def spec_name(block: str) -> str:
    return re.match(r"name: (\S+)", block).group(1)


def photo(index: int, suffix: str = ".jpg") -> bytes:
    """A real photo, shrunk to at most 48 pixels, as JPEG or PNG bytes."""
    image = Image.fromarray(np.asarray(PHOTOS[index % len(PHOTOS)]())).convert("RGB")
    image.thumbnail((48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if suffix == ".png" else "JPEG")
    return buffer.getvalue()


def write(path: Path, content: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The files the walkthrough describes, each kind of source with a few real photos."""
    root = tmp_path_factory.mktemp("own-data")
    for i, rel in enumerate(["beach/0001.jpg", "beach/0002.jpg", "city/0003.png"]):
        write(root / "photos" / rel, photo(i, Path(rel).suffix))
    write(
        root / "captions.csv",
        "file,caption\nbeach/0001.jpg,a dog running on the beach\nbeach/0001.jpg,a brown dog in the sand\n"
        "beach/0002.jpg,waves on the sand\ncity/0003.png,a red bus on a busy street\n",
    )
    write(root / "photos/beach/0001.txt", "a dog running on the beach\na brown dog in the sand\n")
    write(root / "photos/beach/0002.txt", "waves on the sand\n")
    write(root / "photos/city/0003.txt", "a red bus on a busy street\n")
    hf = [("0001.jpg", "a dog running on the beach"), ("0002.jpg", "two cups of coffee")]
    for i, (name, _) in enumerate(hf):
        write(root / "hf-photos" / name, photo(i + 2))
    write(root / "hf-photos/metadata.jsonl", "".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in hf))
    images = [{"id": i + 1, "file_name": f"00000000000{i + 1}.jpg", "width": 48, "height": 48} for i in range(2)]
    for i, image in enumerate(images):
        write(root / "coco/train2017" / image["file_name"], photo(i))
    annotations = [{"id": 10 + i, "image_id": 1 + i % 2, "caption": f"caption {i}"} for i in range(4)]
    write(root / "coco/annotations/captions_train2017.json", json.dumps({"images": images, "annotations": annotations}))
    turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."}]
    write(root / "llava/images/000000033471.jpg", photo(1))
    entry = {"id": "1", "image": "000000033471.jpg", "conversations": turns}
    write(root / "llava/llava_instruct.json", json.dumps([entry]))
    table = pa.table({"image": [photo(i) for i in range(3)], "caption": ["a man", "a cat", "a cup"]})
    pq.write_table(table, root / "pairs.parquet")
    (root / "shards").mkdir()
    with tarfile.open(root / "shards/000000.tar", "w") as tar:
        for i in range(3):
            for name, content in ((f"{i:04d}.jpg", photo(i)), (f"{i:04d}.txt", f"photo number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    saved_hf_dataset(root / "data/coco_captions")
    return root


def saved_hf_dataset(folder: Path) -> None:
    """A DatasetDict (train, validation) with an Image() and a caption column, as `datasets` saves it."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    splits = {}
    for name, start in (("train", 0), ("validation", 2)):
        images = [Image.open(io.BytesIO(photo(start + i))) for i in range(2)]
        captions = [f"{name} photo {i}" for i in range(2)]
        splits[name] = datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))


def test_the_walkthrough_covers_every_file_source():
    text = "\n".join(BLOCKS)
    for kind in ("image-folder", "coco", "llava-json", "parquet", "webdataset", "hf-disk"):
        assert f"kind: {kind}" in text, kind
    assert "captions_file:" in text and "path: hf-photos}" in text and "path: photos, label_from_parent" in text
    assert any("stages:" in block for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[spec_name(b) for b in BLOCKS])
def test_each_spec_validates_and_reads_every_row(data_dir, block):
    spec = data_dir / f"{spec_name(block)}.yaml"
    spec.write_text(block, encoding="utf-8")
    recipe = load_recipe(spec)  # what `vlmflow validate` runs; a SpecError names file, line and field
    for index, source in enumerate(recipe.data.sources):
        context = SourceContext(name=source_name(source, index), seed=0, shard_size=100)
        reader = SOURCES.get(source.kind)
        produced = [item for unit in reader.plan(source, context) for item in reader.read(source, context, unit)]
        assert produced, f"{spec.name}: source {context.name} read no rows"
        for item in produced:
            assert isinstance(item, RawRow), f"{spec.name}: {item}"
            assert item.image and (item.captions or item.extra.get("conversations")), f"{spec.name}: {item.key}"


def test_the_training_spec_plans(data_dir, tmp_path):
    block = next(b for b in BLOCKS if "stages:" in b)
    spec = data_dir / "train-plan.yaml"
    spec.write_text(block, encoding="utf-8")
    result = CliRunner().invoke(cli, ["plan", str(spec), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "train-caption" in result.output
