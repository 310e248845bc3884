# Code that a model folder ships: finetune must not run it unless model.trust_remote_code is true.
from pathlib import Path

Path(__file__).with_name("EXECUTED").write_text("remote code ran")
