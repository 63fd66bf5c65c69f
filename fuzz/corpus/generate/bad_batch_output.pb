
	flux-tiny08P X ê¢#a red circle on a yellow background¢a second prompt over max_batch