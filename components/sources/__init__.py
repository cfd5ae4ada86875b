"""Source readers; importing this package registers every `kind:` in SOURCES."""

from vlmflow.components.sources import coco, hf_disk, image_folder, llava_json, parquet, synthetic, url_list, webdataset  # noqa: F401
