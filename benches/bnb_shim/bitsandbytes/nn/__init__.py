"""No quantized layer types: peft's is_bnb_4bit_available() is False, and isinstance checks are never reached
for unquantized models."""
