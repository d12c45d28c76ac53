from bitsandbytes import MESSAGE


def __getattr__(name):
    raise AttributeError(f"{MESSAGE}: functional.{name}")
