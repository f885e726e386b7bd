# A thaw function in Python. The module's top level runs once, in init, and lands in the
# snapshot: import modules, load files and build tables here, not in handle.
import json

with open("/app/greetings.json") as f:
    GREETINGS = json.load(f)


# Called for each request with its body: bytes, or str as annotated here. What it returns is
# the response: str or bytes as they are, anything else as JSON. print() goes to the log.
def handle(request: str):
    fields = json.loads(request) if request else {}
    greeting = GREETINGS.get(fields.get("lang"), GREETINGS["en"])
    return {"message": f"{greeting}, {fields.get('name', 'world')}!"}
