from curation_assets.demo.run import main

main()
