"""The "100 best Alpaca" experiment (recipes/llama2_7b_lora_alpaca100.py): select the most valuable records,
train (optionally easy -> hard), decode over a grid and judge the answers."""
