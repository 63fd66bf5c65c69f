
	flux-tiny08P X ¢#a red circle on a yellow backgroundÒ
first_block_cacheš™™™™™¹?