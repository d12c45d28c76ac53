from bitsandbytes import MESSAGE


class Optimizer2State:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(MESSAGE)
