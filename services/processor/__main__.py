from services.processor.server import main

main()
