module ollama-like

go 1.19
