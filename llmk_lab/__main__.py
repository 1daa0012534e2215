from llmk_lab.cli import main

main()
