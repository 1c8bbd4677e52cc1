# The llama2-7b-chat endpoint page's own Python snippet (../shared/seed/llama2-7b-chat.md),
# with only the URL changed to the local endpoint (scripts/local_endpoint.sh). Against
# RunPod, use https://api.runpod.ai/v2/<endpoint_id>/run and your API key.
import requests
import json
import time

url = f"http://127.0.0.1:8000/v2/local/run"

headers = {
  "Authorization":"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
  "Content-Type": "application/json"
}

prompt = """
Write me an essay about how the french revolution impacted the rest of europe over the 18th century. 
"""

payload = {
  "input": {
    "prompt": prompt,
    "sampling_params": {
      "max_tokens": 1000,
      "n": 1,
      "presence_penalty": 0.2,
      "frequency_penalty": 0.7,
      "temperature": 0.3,
    }
  }
}

response = requests.post(url, headers=headers, json=payload)
response_json = json.loads(response.text)
status_url = f"http://127.0.0.1:8000/v2/local/stream/{response_json['id']}"


for i in range(10):
  time.sleep(1)
  get_status = requests.get(status_url, headers=headers)
  print(get_status.text) 
