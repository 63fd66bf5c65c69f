
	flux-tiny08P X ¢#a red circle on a yellow backgroundÊ
none‰PNG

