"""`posttrain db`: the database itself."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="The database: schema migrations.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(url: Optional[str] = typer.Option(None, "--url", help="SQLAlchemy URL (default: POSTTRAIN_DB_URL, "
                                                 "else posttrain.db under POSTTRAIN_HOME).")):
    """Bring the database's schema up to this posttrain's newest revision, copying a SQLite file
    first (posttrain.db.REVISION.bak). posttrain also does this whenever it opens the database."""
    from posttrain.config import settings
    from posttrain.migrations import upgrade

    typer.echo(str(upgrade(url or settings().db_url)))
