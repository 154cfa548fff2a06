"""Flower ServerApp: hands the grid and run config to fedapps.server."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedapps import server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    server.run(grid, context)
