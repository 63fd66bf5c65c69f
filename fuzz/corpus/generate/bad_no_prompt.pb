
	flux-tiny08P X 