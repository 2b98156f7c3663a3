"""Lab stand-in for the ChatGLM-6B repo's command-line demo: chat in a terminal."""
import sys

from transformers import AutoModel, AutoTokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "THUDM/chatglm-6b"
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModel.from_pretrained(path, trust_remote_code=True).float().eval()
history = []
for line in sys.stdin:
    response, history = model.chat(tokenizer, line.strip(), history=history)
    print(response, flush=True)
