"""``ettin export`` and ``ettin import``: our checkpoints <-> Hugging Face transformers directories."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        checkpoint: Path = typer.Argument(..., help="A checkpoint, a run directory (its last checkpoint), a Hugging Face directory or a Hub id (ORG/NAME)."),
        out: Path = typer.Option(..., "--out", help="Hugging Face directory to write."),
        force: bool = typer.Option(False, "--force", help="Replace --out even if it holds something else."),
    ):
        """Write CHECKPOINT in Hugging Face format (ModernBertForMaskedLM / ModernBertDecoderForCausalLM)."""
        from ettin.convert.hf import export_checkpoint

        export_checkpoint(checkpoint, out, force=force)
        typer.echo(f"wrote {out}")

    @app.command("import")
    def import_cmd(
        hf_dir: Path = typer.Argument(..., help="A transformers ModernBERT / ModernBERT-decoder directory, or a Hub id (ORG/NAME) fetched into the HF cache."),
        out: Path = typer.Option(..., "--out", help="ettin checkpoint directory to write."),
        force: bool = typer.Option(False, "--force", help="Replace --out even if it holds something else."),
    ):
        """Read a Hugging Face ModernBERT-style directory into an ettin checkpoint (no code from it is run)."""
        from ettin.checkpoint import load_config
        from ettin.convert.hf import import_hf

        import_hf(hf_dir, out, force=force)
        cfg = load_config(out)
        typer.echo(f"wrote {out} ({cfg.kind}, {cfg.name}, {cfg.num_params():,} parameters)")
