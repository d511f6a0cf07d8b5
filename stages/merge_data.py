"""``mtk merge-data``: concatenate several prepared .bin/.idx pairs into one."""

from __future__ import annotations

import typer

from stages.common import console, fail

SUMMARY = "Merge several prepared .bin/.idx datasets into one (same tokenizer, same dtype)."


def merge_data(
    prefixes: list[str] = typer.Argument(
        ...,
        help="Input prefixes (PREFIX.bin / PREFIX.idx), in the order their documents should appear.",
        show_default=False,
    ),
    output_prefix: str = typer.Option(
        ...,
        "--output-prefix",
        "-o",
        help="Output prefix: writes OUT.bin, OUT.idx and OUT.mtk.json.",
        show_default=False,
    ),
) -> None:
    """Concatenate datasets as Megatron's tools/merge_datasets.py does; their manifests must agree."""
    from mtk.data.indexed import IndexedDatasetError, merge_datasets
    from mtk.manifest import ManifestError, data_manifest_path, describe_file, read_manifest, write_manifest

    tokenizers = {}
    for prefix in prefixes:
        if data_manifest_path(prefix).exists():
            try:
                manifest = read_manifest(data_manifest_path(prefix))
            except ManifestError as err:
                fail(str(err))
            tokenizers[prefix] = manifest.get("tokenizer")
    identities = {prefix: _tokenizer_identity(entry) for prefix, entry in tokenizers.items()}
    if len(set(identities.values())) > 1:
        listing = "\n".join(f"  {prefix}: {identity}" for prefix, identity in identities.items())
        fail(
            f"the inputs were prepared with different tokenizers; merging them would mix vocabularies:\n{listing}"
        )
    try:
        merged = merge_datasets(prefixes, output_prefix)
    except IndexedDatasetError as err:
        fail(str(err))
    first_manifest = next(iter(tokenizers.values()), None)
    write_manifest(
        data_manifest_path(output_prefix),
        stage="merge-data",
        prefix=output_prefix,
        tokenizer=first_manifest,
        vocab_size=first_manifest.get("vocab_size") if first_manifest else None,
        eod=first_manifest.get("eod") if first_manifest else None,
        dtype=str(merged.dtype),
        counts={"documents": merged.num_documents, "sequences": len(merged), "tokens": merged.num_tokens},
        inputs=[{"prefix": p, "manifest": p in tokenizers} for p in prefixes],
        outputs=[
            describe_file(f"{output_prefix}.bin", with_hash=False),
            describe_file(f"{output_prefix}.idx"),
        ],
    )
    if len(tokenizers) < len(prefixes):
        console.print(
            f"[yellow]note:[/] {len(prefixes) - len(tokenizers)} input(s) have no mtk manifest; "
            "their tokenizer could not be checked."
        )
    console.print(
        f"merged {len(prefixes)} datasets: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens "
        f"-> {output_prefix}.bin/.idx"
    )


def _tokenizer_identity(entry: dict | None) -> str:
    """What makes two tokenizers equal: kind, settings and file contents (not their paths)."""
    if not entry:
        return "unknown"
    files = sorted(f.get("sha256", "") for f in entry.get("files", []))
    settings = {k: v for k, v in sorted(entry.items()) if k != "files"}
    return f"{settings} files={files}"
