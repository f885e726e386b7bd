# The Python hello: the same work as the Rust hello (examples/hello), a JSON request in and a
# JSON greeting out. `thaw pack examples/python/hello`.
import json


def handle(request):
    name = json.loads(request or b"{}").get("name", "world")
    return {"greeting": f"Hello, {name}!"}
