"""Data assets: raw pretraining text, its token shards, and the instruction prompts."""


import itertools

import dagster as dg

from nanogpt_core.config import get_finetune_profile
from nanogpt_core.data.folder_source import scan_folder
from nanogpt_core.data.instructions import prepare_from_source
from nanogpt_core.data.raw import iter_raw_texts, write_raw_parquet
from nanogpt_core.data.text_sources import TextSourceError, iter_documents
from nanogpt_core.shards import build_shards
from pipeline.config import InstructionConfig, RawTextConfig, ShardsConfig
from pipeline.incoming import FOLDER_HASH_METADATA, incoming_folder
from pipeline.resources import ArtifactStore
from pipeline.upstream import latest_output

DATA_GROUP = "data"


@dg.asset(group_name=DATA_GROUP, kinds={"parquet"}, code_version="1",
          description="Pretraining documents (FineWeb-Edu, local files, the incoming text folder or the offline "
                      "demo corpus) as parquet.")
def raw_fineweb(context: dg.AssetExecutionContext, config: RawTextConfig,
                artifacts: ArtifactStore) -> dg.MaterializeResult:
    source = config.source or config.train_config().data_source
    metadata: dict = {"source": source}
    try:
        if source == "folder":
            # Scanned here rather than inside iter_documents, so the hash recorded is the one read.
            snapshot = scan_folder(config.path or incoming_folder(artifacts))
            if config.limit is not None and config.limit < 0:
                raise TextSourceError(f"limit must be a number of documents (0 or more), got {config.limit}")
            documents = itertools.islice(snapshot.documents(), config.limit)
            description = snapshot.describe()
            metadata.update({"folder": dg.MetadataValue.path(str(snapshot.folder)), "files": len(snapshot.files),
                             FOLDER_HASH_METADATA: snapshot.content_hash})
        else:
            documents = iter_documents(source, path=config.path, limit=config.limit)
            description = {"source": source, "path": config.path}
        scratch = artifacts.scratch("raw_fineweb")
        stats = write_raw_parquet(documents, scratch / "documents.parquet",
                                  source={**description, "limit": config.limit})
    except TextSourceError as e:
        raise dg.Failure(f"raw_fineweb cannot read its {source} source: {e}") from e
    folder = artifacts.promote(scratch, "raw_fineweb", stats.content_hash)
    context.log.info(f"{stats.documents} documents, {stats.characters} characters from {source}")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(folder / "documents.parquet")), **metadata,
                  "documents": stats.documents, "characters": stats.characters, "bytes": stats.bytes,
                  "content_hash": stats.content_hash},
        data_version=dg.DataVersion(stats.content_hash))


@dg.asset(group_name=DATA_GROUP, kinds={"numpy"}, code_version="1", deps=[raw_fineweb],
          description="GPT-2 token shards with a train/val split; the data version is a hash of their bytes.")
def token_shards(context: dg.AssetExecutionContext, config: ShardsConfig,
                 artifacts: ArtifactStore) -> dg.MaterializeResult:
    raw = latest_output(context, "raw_fineweb")
    scratch = artifacts.scratch("token_shards")
    manifest = build_shards(iter_raw_texts(raw.path), scratch, val_fraction=config.val_fraction,
                            shard_tokens=config.shard_tokens,
                            source={"raw_fineweb": str(raw.path), "raw_data_version": raw.data_version})
    folder = artifacts.promote(scratch, "token_shards", manifest.data_version)
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(folder)), "data_version": manifest.data_version,
                  "raw_data_version": raw.data_version,
                  "train_tokens": manifest.tokens["train"], "val_tokens": manifest.tokens["val"],
                  "train_documents": manifest.documents["train"], "val_documents": manifest.documents["val"],
                  "shards": len(manifest.shards), "bytes": manifest.bytes},
        data_version=dg.DataVersion(manifest.data_version))


@dg.asset(group_name=DATA_GROUP, kinds={"numpy"}, code_version="1",
          description="Instruction/response pairs (Dolly-15k, a local JSON-lines file, or the offline demo "
                      "conversations) in the prompt template, tokenized, with prompt tokens masked out of the loss.")
def dolly_prompts(context: dg.AssetExecutionContext, config: InstructionConfig,
                  artifacts: ArtifactStore) -> dg.MaterializeResult:
    source = config.source or get_finetune_profile(config.profile).data_source
    scratch = artifacts.scratch("dolly_prompts")
    manifest = prepare_from_source(source, scratch, context_length=config.train_config().block_size,
                                   path=config.path, limit=config.limit)
    folder = artifacts.promote(scratch, "dolly_prompts", manifest.data_version)
    if manifest.skipped:
        context.log.warning(f"skipped rows by reason: {manifest.skipped}")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(folder)), "source": source,
                  "rows_read": manifest.rows_read, "train_examples": manifest.examples["train"],
                  "val_examples": manifest.examples["val"], "response_tokens": manifest.response_tokens["train"],
                  "skipped": dg.MetadataValue.json(manifest.skipped),
                  "categories": dg.MetadataValue.json(manifest.categories)},
        data_version=dg.DataVersion(manifest.data_version))
