"""What a run optimises, each objective a module behind one small protocol (protocol.py: the Workload a preflight
finds, the three steps of an Objective): supervised fine-tuning with TRL's SFTTrainer (sft.py, its trainer in
sft_trainer.py), preference pairs with TRL's DPOTrainer (dpo.py) and reward functions with TRL's GRPOTrainer
(grpo.py); trl_run.py holds what the two last share. registry.py maps a recipe's objective to its settings class
and its steps. The shared flow that runs them is harness.run.flow.
"""
