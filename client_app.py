"""Flower ClientApp: one handler per message type, each delegating to fedapps.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedapps import client

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.describe(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.train_global(msg, context)


@app.train("mutual")
def train_mutual(msg: Message, context: Context) -> Message:
    return client.train_mutual(msg, context)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    return client.train_local(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client.evaluate(msg, context)


@app.evaluate("finetune")
def finetune(msg: Message, context: Context) -> Message:
    return client.finetune(msg, context)
