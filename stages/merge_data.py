"""``mtk merge-data``: concatenate several prepared .bin/.idx pairs into one."""

from __future__ import annotations

import typer

from .common import console, fail


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
    from mtk.data.indexed import IndexedDatasetError
    from mtk.data.prepared import merge_prepared
    from mtk.manifest import ManifestError

    try:
        result = merge_prepared(prefixes, output_prefix)
    except (ManifestError, IndexedDatasetError) as err:
        fail(str(err))
    if result.unchecked:
        console.print(
            f"[yellow]note:[/] {len(result.unchecked)} input(s) have no mtk manifest; "
            "their tokenizer could not be checked."
        )
    merged = result.dataset
    console.print(
        f"merged {len(prefixes)} datasets: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens "
        f"-> {output_prefix}.bin/.idx"
    )
